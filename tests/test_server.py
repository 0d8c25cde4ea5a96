"""In-process tests of every route and error code (FastAPI TestClient runs the lifespan)."""

from __future__ import annotations

import base64
import json
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings


def make_client(tiny_stores, **overrides) -> TestClient:
    settings = ServerSettings(stores=[tiny_stores["tiny-bert"], tiny_stores["tiny-llama"]], **overrides)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(tiny_stores):
    with make_client(tiny_stores, shadow_rate=1.0) as client:
        yield client


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"message", "type", "param", "code"} <= error.keys() and error["message"]
    if code:
        assert error["code"] == code
    return error


def test_health_and_models(client):
    assert client.get("/health/live").json() == {"status": "alive"}
    ready = client.get("/health/ready")
    assert ready.status_code == 200 and set(ready.json()["models"]) == {"tiny-bert", "tiny-llama"}
    models = {m["id"]: m["ann_mlp"] for m in client.get("/v1/models").json()["data"]}
    assert models["tiny-bert"]["kind"] == "encoder" and models["tiny-llama"]["kind"] == "causal_lm"
    assert models["tiny-llama"]["backend"] == "ivf" and models["tiny-llama"]["k"] == 16
    assert len(models["tiny-llama"]["tuned_search_params"]) == 2
    assert 0 < models["tiny-bert"]["build_recall_mean"] <= 1


def test_embeddings_float_and_base64(client):
    body = {"model": "tiny-bert", "input": ["hello", "a longer sentence here"], "encoding_format": "float"}
    floats = client.post("/v1/embeddings", json=body).json()
    assert [d["index"] for d in floats["data"]] == [0, 1]
    vector = np.array(floats["data"][0]["embedding"])
    assert vector.shape == (32,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0
    encoded = client.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(encoded["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, vector, rtol=1e-6)


def test_default_mode_auto_follows_the_build_plan(client, tiny_stores):
    manifest = json.loads((tiny_stores["tiny-bert"] / "manifest.json").read_text())
    approx_up_to = [layer["plan"]["approx_up_to"] for layer in manifest["layers"]]
    body = {"model": "tiny-bert", "texts": ["several words in one single input"]}
    auto = client.post("/v1/infer", json=body).json()
    assert auto["mode"] == "auto"
    dense_layers = sum(auto["tokens"] > limit for limit in approx_up_to)
    assert auto["dense_fraction"] == pytest.approx(dense_layers / len(approx_up_to))
    if dense_layers == len(approx_up_to):
        assert auto["scanned_fraction"] == pytest.approx(1.0)  # dense layers score every key
    approx = client.post("/v1/infer", json={**body, "mode": "approx"}).json()
    assert approx["dense_fraction"] is None and approx["mode"] == "approx"


def test_mode_exact_and_full_k_agree(client):
    texts = {"model": "tiny-bert", "input": "the same words", "encoding_format": "float"}
    exact = client.post("/v1/embeddings", json={**texts, "ann_mlp": {"mode": "exact"}}).json()
    full = client.post("/v1/embeddings", json={**texts, "ann_mlp": {"k": 96, "effort": 1000}})
    assert_error(full, 400, "invalid_request")  # effort outside the manifest's bounds
    hi = client.get("/v1/models").json()["data"][0]["ann_mlp"]["effort_range"][1]
    full = client.post("/v1/embeddings", json={**texts, "ann_mlp": {"k": 96, "effort": hi}}).json()
    np.testing.assert_allclose(full["data"][0]["embedding"], exact["data"][0]["embedding"], atol=1e-5)
    assert exact["ann_mlp"]["mode"] == "exact" and exact["ann_mlp"]["scanned_fraction"] is None
    assert full["ann_mlp"]["k"] == 96 and full["ann_mlp"]["search_params"] == {"nprobe": hi}
    # The store's own efforts, tuned per layer: one dict when the layers agree, else one per layer.
    tuned = client.get("/v1/models").json()["data"][0]["ann_mlp"]["tuned_search_params"]
    served = client.post("/v1/embeddings", json=texts).json()["ann_mlp"]["search_params"]
    assert served == (tuned[0] if all(params == tuned[0] for params in tuned) else tuned)
    # candidates chosen by contribution: every neuron retrieved, all 96 kept, still exact
    chosen = client.post("/v1/embeddings", json={**texts, "ann_mlp": {"k": 96, "effort": hi, "candidate_factor": 2}})
    np.testing.assert_allclose(chosen.json()["data"][0]["embedding"], exact["data"][0]["embedding"], atol=1e-5)
    assert chosen.json()["ann_mlp"]["candidate_factor"] == 2
    assert chosen.json()["ann_mlp"]["candidates"] == 96  # at most d_ff
    assert full["ann_mlp"]["candidate_factor"] is None and full["ann_mlp"]["candidates"] == 96
    assert_error(
        client.post("/v1/infer", json={"model": "tiny-bert", "texts": ["x"], "candidate_factor": 0.5}),
        422,
        "invalid_value",
    )


def test_infer_compare_reports_core_metrics(client):
    response = client.post(
        "/v1/infer", json={"model": "tiny-llama", "texts": ["def f(x): return x"], "mode": "compare", "top_logprobs": 3}
    )
    body = response.json()
    assert response.status_code == 200, body
    output = body["outputs"][0]
    assert len(output["top_logprobs"]) == 3 and output["next_token_logprob"] <= 0
    layers = body["report"]["layers"]
    assert len(layers) == 2
    for layer in layers:
        assert {"recall_at_k", "mass_recall", "scanned_fraction", "rel_output_error"} <= layer.keys()
    assert {"next_token_agreement", "kl_mean"} <= body["report"]["end_to_end"].keys()
    timing = body["timing"]
    assert timing["total_ms"] >= timing["index_search_ms"] > 0


def test_infer_with_token_ids_and_encoder(client):
    ids = client.post("/v1/infer", json={"model": "tiny-llama", "token_ids": [[5, 6, 7], [8]]}).json()
    assert len(ids["outputs"]) == 2 and ids["tokens"] == 4
    enc = client.post("/v1/infer", json={"model": "tiny-bert", "texts": ["x y z"], "mode": "exact"}).json()
    assert len(enc["outputs"][0]["embedding"]) == 32


def test_completions_greedy_is_deterministic_and_reports_logprobs(client):
    body = {"model": "tiny-llama", "prompt": "Once upon", "max_tokens": 5, "logprobs": 2}
    first = client.post("/v1/completions", json=body).json()
    second = client.post("/v1/completions", json=body).json()
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    logprobs = first["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == first["usage"]["completion_tokens"] <= 5
    assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
    sampled = {**body, "temperature": 1.0, "top_p": 0.9, "seed": 3}
    assert (
        client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
        == client.post("/v1/completions", json=sampled).json()["choices"][0]["text"]
    )


@pytest.mark.parametrize("mode", ["auto", "exact"])  # decoded in a shared batch, and alone
def test_a_stop_text_ends_decoding_where_it_appears(client, mode):
    body = {"model": "tiny-llama", "prompt": "Once upon", "max_tokens": 24, "ann_mlp": {"mode": mode}}
    free = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    stop = free[len(free) // 3 : len(free) // 3 + 2]
    assert stop, free
    stopped = client.post("/v1/completions", json={**body, "stop": [stop], "logprobs": 0}).json()
    choice = stopped["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["text"] == free[: free.index(stop)]
    # Decoding ended with the token that completed the stop text, not at max_tokens.
    assert stopped["usage"]["completion_tokens"] < 24
    assert stop in "".join(choice["logprobs"]["tokens"])


def test_shadow_sampling_feeds_metrics_and_models(client):
    client.post("/v1/infer", json={"model": "tiny-bert", "texts": ["shadow me please"]})
    for _ in range(50):  # the shadow runs after the answer, on the worker
        live = {m["id"]: m["ann_mlp"]["live"] for m in client.get("/v1/models").json()["data"]}
        if live["tiny-bert"]:
            break
        threading.Event().wait(0.05)
    assert live["tiny-bert"]["samples"] >= 1 and 0 <= live["tiny-bert"]["recall_at_k"] <= 1
    metrics = client.get("/metrics").text
    assert 'ann_mlp_live_recall_at_k{model="tiny-bert"}' in metrics
    assert 'ann_mlp_request_seconds_bucket{le="0.005",mode="auto",route="/v1/infer"}' in metrics
    assert 'ann_mlp_requests_total{route="/v1/infer",status="200"}' in metrics
    assert "ann_mlp_requests_in_flight" in metrics and "ann_mlp_keys_scanned_fraction_bucket" in metrics


@pytest.mark.parametrize(
    "path, body, status, code",
    [
        ("/v1/embeddings", {"input": 5}, 422, "invalid_value"),
        ("/v1/embeddings", {"input": "x", "ann_mlp": {"mode": "fast"}}, 422, "invalid_value"),
        ("/v1/embeddings", {"input": "x", "ann_mlp": {"k": 0}}, 422, "invalid_value"),
        ("/v1/embeddings", {"input": "x", "ann_mlp": {"k": 97}}, 400, "invalid_request"),
        ("/v1/embeddings", {"input": "x", "model": "gpt-9"}, 404, "model_not_found"),
        ("/v1/embeddings", {"input": "x", "model": "tiny-llama"}, 400, "invalid_request"),
        ("/v1/embeddings", {"input": [""]}, 400, "invalid_request"),
        ("/v1/embeddings", {"input": ["a"] * 65}, 400, "invalid_request"),
        ("/v1/embeddings", {"input": "word " * 600}, 400, "invalid_request"),
        ("/v1/completions", {"prompt": "x", "model": "tiny-llama", "stream": True}, 422, "invalid_value"),
        ("/v1/completions", {"prompt": "x", "model": "tiny-llama", "max_tokens": 10_000}, 400, "invalid_request"),
        ("/v1/completions", {"prompt": "x", "model": "tiny-bert"}, 400, "invalid_request"),
        ("/v1/infer", {"model": "tiny-llama"}, 400, "invalid_request"),
        ("/v1/infer", {"model": "tiny-llama", "token_ids": [[10**6]]}, 400, "invalid_request"),
        ("/v1/infer", {"model": "tiny-llama", "texts": ["a"], "unknown": 1}, 422, "invalid_value"),
        ("/v1/nowhere", {}, 404, None),
        # limits come from the model: tiny-llama has 256 positions
        ("/v1/infer", {"model": "tiny-llama", "token_ids": [[5] * 257], "mode": "exact"}, 400, "invalid_request"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": [[5, 5]], "max_tokens": 255}, 400, "invalid_request"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "x" * 250, "max_tokens": 10}, 400, "invalid_request"),
        ("/v1/infer", {"model": "tiny-llama", "token_ids": [[False]]}, 422, "invalid_value"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": [1, True]}, 422, "invalid_value"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "seed": 2**64}, 422, "invalid_value"),
        ("/v1/completions", {"model": "tiny-llama", "prompt": "x", "seed": -1}, 422, "invalid_value"),
    ],
)
def test_bad_requests(client, path, body, status, code):
    assert_error(client.post(path, json=body), status, code)


def test_the_wrong_route_names_the_right_one(client):
    error = assert_error(client.post("/v1/embeddings", json={"model": "tiny-llama", "input": "x"}), 400)
    assert error["message"] == "model 'tiny-llama' (causal_lm) is not an encoder: use /v1/completions or /v1/infer"
    error = assert_error(client.post("/v1/completions", json={"model": "tiny-bert", "prompt": "x"}), 400)
    assert error["message"] == "model 'tiny-bert' (encoder) is not a causal LM: use /v1/embeddings or /v1/infer"


def test_context_errors_name_the_model_and_its_positions(client):
    error = assert_error(client.post("/v1/infer", json={"model": "tiny-llama", "token_ids": [[5] * 257]}), 400)
    assert error["message"] == "an input of 257 tokens exceeds tiny-llama's context of 256 positions"
    error = assert_error(
        client.post("/v1/completions", json={"model": "tiny-llama", "prompt": [[5, 5]], "max_tokens": 255}), 400
    )
    assert "2 tokens + 255 new tokens exceeds tiny-llama's context of 256 positions" in error["message"]


def test_values_at_the_edges_are_refused_or_served_never_500(client):
    infinite = b'{"model": "tiny-bert", "input": "x", "ann_mlp": {"candidate_factor": Infinity}}'
    response = client.post("/v1/embeddings", content=infinite, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_value")
    surrogate = b'{"model": "tiny-bert", "input": "abc\\ud800def"}'  # an unpaired surrogate, escaped as JSON allows
    response = client.post("/v1/embeddings", content=surrogate, headers={"content-type": "application/json"})
    assert "cannot be tokenized" in assert_error(response, 400, "invalid_request")["message"]
    tiny = client.post(
        "/v1/completions", json={"model": "tiny-llama", "prompt": "Once", "max_tokens": 4, "temperature": 5e-324}
    )
    greedy = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "Once", "max_tokens": 4})
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


def test_a_requests_whole_work_is_bounded_and_compare_counts_twice(tiny_stores):
    with make_client(tiny_stores, max_request_tokens=100) as client:
        ids = {"model": "tiny-llama", "token_ids": [[5] * 30, [6] * 30]}
        assert client.post("/v1/infer", json={**ids, "mode": "approx"}).status_code == 200
        error = assert_error(client.post("/v1/infer", json={**ids, "mode": "compare"}), 400, "invalid_request")
        assert error["message"] == (
            "the request's work of 120 tokens (compare mode counts twice) exceeds the limit of 100"
        )
        completion = {"model": "tiny-llama", "prompt": [[5] * 10], "max_tokens": 91}
        assert "work of 101 tokens" in assert_error(client.post("/v1/completions", json=completion), 400)["message"]
        texts = {"model": "tiny-bert", "input": ["word " * 30] * 4}  # texts: counted on the worker, same answer
        assert "exceeds the limit of 100" in assert_error(client.post("/v1/embeddings", json=texts), 400)["message"]


def test_an_empty_api_key_is_refused_at_start():
    with pytest.raises(ValueError, match="api_key is empty"):
        ServerSettings(api_key="")
    with pytest.raises(ValueError, match="api_key is empty"):
        ServerSettings(api_key="  ")


def test_malformed_json_is_422(client):
    response = client.post("/v1/infer", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_json")
    error = response.json()["error"]
    assert error["param"] is None and "not valid JSON (character 1)" in error["message"]


def test_body_limit_counts_received_bytes(tiny_stores):
    with make_client(tiny_stores, max_body_bytes=1000) as client:
        assert_error(client.post("/v1/infer", json={"texts": ["a" * 2000]}), 413, "body_too_large")

        def chunks():  # no Content-Length: the limit must hold on the bytes themselves
            yield b'{"texts": ["'
            for _ in range(20):
                yield b"a" * 100
            yield b'"]}'

        response = client.post("/v1/infer", content=chunks(), headers={"content-type": "application/json"})
        assert_error(response, 413, "body_too_large")


def test_api_key_on_every_route_but_health(tiny_stores):
    with make_client(tiny_stores, api_key="s3cret") as client:
        assert client.get("/health/live").status_code == 200
        assert client.get("/health/ready").status_code == 200
        for method, path in (("get", "/v1/models"), ("get", "/metrics"), ("post", "/v1/infer")):
            assert_error(getattr(client, method)(path), 401, "invalid_api_key")
            wrong = getattr(client, method)(path, headers={"Authorization": "Bearer nope"})
            assert_error(wrong, 401)
        ok = client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_deadline_gives_504(tiny_stores):
    with make_client(tiny_stores, request_timeout_s=0.0005) as client:
        response = client.post("/v1/completions", json={"model": "tiny-llama", "prompt": "x", "max_tokens": 64})
        assert_error(response, 504, "deadline_exceeded")


def test_full_queue_gives_429_with_retry_after(tiny_stores):
    with make_client(tiny_stores, queue_size=1, retry_after_s=2) as client:
        slow = {"model": "tiny-llama", "prompt": "x", "max_tokens": 200}
        results = []
        threads = [
            threading.Thread(target=lambda: results.append(client.post("/v1/completions", json=slow))) for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        statuses = sorted(r.status_code for r in results)
        assert statuses[0] == 200 and 429 in statuses, statuses
        rejected = next(r for r in results if r.status_code == 429)
        assert rejected.headers["retry-after"] == "2"
        assert_error(rejected, 429, "queue_full")


def test_draining_refuses_new_requests(tiny_stores):
    with make_client(tiny_stores) as client:
        client.app.state.engine.begin_drain()
        assert client.get("/health/ready").status_code == 503
        assert_error(client.post("/v1/infer", json={"texts": ["a"]}), 503, "not_ready")


@pytest.mark.parametrize("job", [dict(deadline=0.0), dict(deadline=float("inf"), abandoned=True)])
def test_a_forward_pass_stops_before_its_next_layer_once_its_job_should_end(tiny_stores, job):
    """Work that is not decoding (a long /v1/infer, compare mode) ends within one layer of its
    deadline or of its caller leaving: the engine checks before every layer."""
    from ann_mlp.capture import batch_from_ids
    from server.engine import Engine, JobState, Knobs
    from server.errors import DeadlineExceeded
    from server.metrics import Metrics

    engine = Engine(ServerSettings(stores=[tiny_stores["tiny-llama"]]), Metrics())
    engine.load()
    served = engine.model("tiny-llama")
    adapter = served.approx.checkpoint.adapter
    entered = []
    second_layer, _ = adapter.slot(adapter.mlp_input_path(1))
    second_layer.register_forward_pre_hook(lambda *_: entered.append(1))
    batch = batch_from_ids(served.approx.checkpoint, [[5, 6, 7, 8]])
    with engine.running([JobState(**job)]):
        for mode in ("compare", "approx", "exact"):
            with pytest.raises(DeadlineExceeded):
                engine.run(served, batch, Knobs(mode=mode))
    assert entered == []  # stopped before the first layer, every time
    # A pass shared by several requests stops only when every one of them should.
    with engine.running([JobState(**job), JobState(deadline=float("inf"))]):
        engine.run(served, batch, Knobs(mode="approx"))
    assert entered
    entered.clear()
    engine.run(served, batch, Knobs(mode="compare"))  # no job to stop: the pass runs through
    assert entered


def test_a_wrong_method_is_a_json_405_naming_the_allowed_one(client):
    response = client.get("/v1/completions")
    assert_error(response, 405)
    assert response.headers["Allow"] == "POST"


def test_the_schema_declares_responses_and_metrics_as_text(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/embeddings", "/v1/completions", "/v1/infer"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "404", "413", "422", "429", "503", "504"} <= responses.keys()
        assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("Response")
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "application/json" not in metrics and any(kind.startswith("text/plain") for kind in metrics)


def test_bfloat16_stores_serve_embeddings_and_completions(half_checkpoints, tmp_path):
    """A bfloat16 encoder and causal LM, served in their dtype: float32 embeddings of unit norm,
    completions exact and approximate (test_decode checks bfloat16 tokens against generate())."""
    from ann_mlp.build import build_store
    from ann_mlp.config import BuildConfig, TextConfig

    config = BuildConfig(k=16, calibration=TextConfig(max_tokens=600), plan=False)
    stores = [
        build_store(str(half_checkpoints[family, "bfloat16"]), tmp_path / name, config, progress=False)
        for family, name in (("bert", "bf16-bert"), ("llama", "bf16-llama"))
    ]
    with TestClient(create_app(ServerSettings(stores=stores))) as client:
        body = {"model": "bf16-bert", "input": ["hello there"], "encoding_format": "base64"}
        encoded = client.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
        assert abs(np.linalg.norm(np.frombuffer(base64.b64decode(encoded), dtype="<f4")) - 1) < 1e-3
        completions = {
            mode: client.post(
                "/v1/completions",
                json={"model": "bf16-llama", "prompt": "Weights", "max_tokens": 6, "temperature": 0, "mode": mode},
            )
            for mode in ("exact", "approx")
        }
        for response in completions.values():
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] >= 1
