"""OpenAI-compatible routes: /v1/embeddings (encoders) and /v1/completions (causal LMs)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Depends, Request

from ann_mlp.decode import Sequence
from server import ops
from server.batching import MERGED_MODES
from server.deps import engine as get_engine
from server.deps import require_api_key
from server.engine import Engine, Knobs, Run
from server.errors import InvalidRequest
from server.schemas import (
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    error_responses,
)

router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(require_api_key)],
    responses=error_responses(400, 401, 404, 413, 422, 429, 499, 503, 504),
)
# Where a model of each kind is served, for the answer to a request on the wrong route.
ROUTE_FOR = {
    "encoder": "use /v1/embeddings or /v1/infer",
    "causal_lm": "use /v1/completions or /v1/infer",
    "seq2seq": "use /v1/infer (text-to-text models are served teacher-forced there)",
}


@router.post("/embeddings", response_model=EmbeddingResponse)
async def embeddings(request: EmbeddingRequest, http: Request, engine: Engine = Depends(get_engine)) -> dict:
    http.state.mode = request.ann_mlp.mode
    served = engine.model(request.model)
    if served.kind != "encoder":
        raise InvalidRequest(
            f"model {served.name!r} ({served.kind}) is not an encoder: {ROUTE_FOR[served.kind]}", param="model"
        )
    if request.dimensions is not None:
        raise InvalidRequest("dimensions is not supported: embeddings have the model's width", param="dimensions")
    knobs = Knobs(**request.ann_mlp.model_dump())
    inputs = ops.as_list(request.input)
    compare = knobs.mode == "compare"
    checked = ops.checked_token_ids(served, inputs, engine.settings, "input", compare=compare)

    def prepare() -> list[list[int]]:
        return checked or ops.tokenize(served, inputs, engine.settings, "input", compare=compare)

    def finish(run: Run):
        return run.batch.num_tokens, ops.pooled_embeddings(run), ops.run_info(served, knobs, run)

    tokens, vectors, info = await engine.batches.forward(
        served, knobs, len(inputs), prepare, finish, http.is_disconnected
    )
    return {
        "object": "list",
        "model": served.name,
        "data": [
            {"object": "embedding", "index": i, "embedding": ops.encode_embedding(v, request.encoding_format)}
            for i, v in enumerate(vectors)
        ],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        "ann_mlp": info.model_dump(),
    }


@router.post("/completions", response_model=CompletionResponse)
async def completions(request: CompletionRequest, http: Request, engine: Engine = Depends(get_engine)) -> dict:
    http.state.mode = request.ann_mlp.mode
    served = engine.model(request.model)
    if served.kind != "causal_lm":
        raise InvalidRequest(
            f"model {served.name!r} ({served.kind}) is not a causal LM: {ROUTE_FOR[served.kind]}", param="model"
        )
    if request.max_tokens > engine.settings.max_new_tokens:
        raise InvalidRequest(
            f"max_tokens {request.max_tokens} exceeds {engine.settings.max_new_tokens}", param="max_tokens"
        )
    inputs = ops.as_list(request.prompt)
    knobs = Knobs(**request.ann_mlp.model_dump())

    limits = dict(new_tokens=request.max_tokens, compare=knobs.mode == "compare")
    checked = ops.checked_token_ids(served, inputs, engine.settings, "prompt", **limits)

    def prepare() -> list[Sequence]:
        prompts = checked or ops.tokenize(served, inputs, engine.settings, "prompt", **limits)
        return ops.sequences(served, prompts, request)

    def finish(sequences: list[Sequence], runs: list[Run]):
        results = [ops.completion(served, s.continuation, request) for s in sequences]
        infos = [ops.run_info(served, knobs, run).model_dump() for run in runs]
        return sum(len(s.prompt) for s in sequences), results, infos

    if knobs.mode in MERGED_MODES:  # decoded in a batch shared with compatible requests

        def finish_shared(sequences: list[Sequence], run: Run):
            return finish(sequences, [run] * len(sequences))

        answer = engine.batches.generate(served, knobs, len(inputs), prepare, finish_shared, http.is_disconnected)
    else:  # exact and compare decode alone: each prompt in turn, bit-identical to a request of its own

        def job():
            sequences = prepare()
            return finish(sequences, [ops.generate(engine, served, s, knobs) for s in sequences])

        answer = engine.submit(job, http.is_disconnected)
    prompt_tokens, results, infos = await answer
    completion_tokens = sum(r["completion_tokens"] for r in results)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": served.name,
        "choices": [
            {"index": i, "text": r["text"], "logprobs": r["logprobs"], "finish_reason": r["finish_reason"]}
            for i, r in enumerate(results)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "ann_mlp": infos,
    }
