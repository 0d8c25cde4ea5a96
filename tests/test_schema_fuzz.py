"""Schemathesis over the served OpenAPI schema: generated requests, valid and invalid, against a real
uvicorn serving tiny stores. Every answer must be a documented status, in its documented shape,
never a 5xx; invalid data must be refused."""

from __future__ import annotations

import os

import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_server_e2e import running_server

# Small limits keep each generated request cheap; the schema does not change with them.
LIMITS = {"ANN_MLP_MAX_INPUTS": "4", "ANN_MLP_MAX_INPUT_TOKENS": "32", "ANN_MLP_MAX_NEW_TOKENS": "4"}
CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, negative_data_rejection]
# Per route and mode: a bounded run in the suite; SCHEMA_FUZZ_EXAMPLES=300 for a long one.
EXAMPLES = int(os.environ.get("SCHEMA_FUZZ_EXAMPLES", "40"))
SEED = 20261207  # the same examples every run


def test_every_route_answers_as_documented(tiny_stores):
    with running_server([tiny_stores["tiny-bert"], tiny_stores["tiny-llama"]], env=LIMITS) as (url, _, _log):
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.label for op in operations} >= {
            "POST /v1/embeddings",
            "POST /v1/completions",
            "POST /v1/infer",
            "GET /v1/models",
            "GET /metrics",
        }
        for operation in operations:
            # Invalid input needs a body or query to be invalid in (a path segment is any string):
            # other routes get valid calls only.
            takes_input = len(operation.query) > 0 or len(operation.body) > 0
            for mode in GenerationMode if takes_input else [GenerationMode.POSITIVE]:

                @given(case=operation.as_strategy(generation_mode=mode))
                @seed(SEED)
                @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
                def answers_as_documented(case):
                    case.call_and_validate(checks=CHECKS)

                answers_as_documented()
