"""A real uvicorn process on 127.0.0.1: the openai client, concurrency, and SIGTERM during load."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(
    stores: list[Path], *args: str, env: dict | None = None, stop: Callable[[subprocess.Popen], None] | None = None
):
    """`ann-mlp serve` in a process of its own, once ready; killed afterwards (or `stop`ped)."""
    port = free_port()
    log = open(Path(stores[0]).parent / f"server-{port}.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", *map(str, stores), "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        # A guard against a hang, not a timing: replicas that plan their stores again on their own
        # thread count take minutes on a busy machine.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("server never became ready")
        yield url, proc, Path(log.name)
    finally:
        if proc.poll() is None:
            (stop or subprocess.Popen.kill)(proc)
        proc.wait()
        log.close()


def wait_submitted(url: str, count: int, timeout_s: float = 60) -> None:
    """Until `count` requests have reached the engine's queue (past validation and the route)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric_value(url, "ann_mlp_jobs_submitted_total") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{count} requests never reached the engine")


@pytest.fixture(scope="module")
def server(minilm_store, tiny_stores):
    with running_server([minilm_store, tiny_stores["tiny-llama"]], "--shadow-rate", "0.5") as (url, _, _log):
        yield url


def test_openai_client_embeddings_match_sentence_transformers(server):
    from sentence_transformers import SentenceTransformer

    from ann_mlp.checkpoint.builtin import resolve_builtin

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    texts = ["A man is eating food.", "The new movie is awesome.", "Offline inference on two cores."]
    exact = client.embeddings.create(model="minilm", input=texts, extra_body={"ann_mlp": {"mode": "exact"}})
    # the client asks for base64
    approx = client.embeddings.create(model="minilm", input=texts, extra_body={"ann_mlp": {"mode": "approx"}})
    auto = client.embeddings.create(model="minilm", input=texts)
    reference = SentenceTransformer(str(resolve_builtin("minilm")), device="cpu").encode(texts)
    exact_vectors = np.array([d.embedding for d in exact.data])
    assert exact_vectors.shape == (3, 384) and exact.usage.prompt_tokens > 0
    np.testing.assert_allclose(exact_vectors, reference, atol=1e-4)
    approx_vectors = np.array([d.embedding for d in approx.data])
    cosines = (approx_vectors * exact_vectors).sum(1)
    assert np.all(cosines > 0) and np.all(cosines < 1 - 1e-6)  # approximate, and it shows
    info = auto.model_extra["ann_mlp"]
    assert info["mode"] == "auto"
    if info["dense_fraction"] == 1.0:  # the plan found no layer where search pays at this size
        np.testing.assert_allclose(np.array([d.embedding for d in auto.data]), exact_vectors, atol=1e-5)


def test_openai_client_completions(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    completion = client.completions.create(
        model="tiny-llama", prompt="The kernel", max_tokens=4, logprobs=1, extra_body={"ann_mlp": {"mode": "compare"}}
    )
    choice = completion.choices[0]
    assert choice.finish_reason in ("length", "stop") and isinstance(choice.text, str)
    assert completion.usage.completion_tokens == len(choice.logprobs.token_logprobs)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    models = {m.id for m in client.models.list()}
    assert models == {"minilm", "tiny-llama"}
    assert client.models.retrieve("minilm").id == "minilm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_sixteen_concurrent_clients_are_isolated(server):
    """Per-request k and mode must not leak: each answer equals the same request made alone,
    bit for bit in modes exact and compare (never merged), and up to float32 summation order in
    mode approx, whose requests with equal knobs may share one padded forward pass."""
    requests = [
        {
            "model": "tiny-llama",
            "texts": [f"request {i} " * (1 + i % 3)],
            "k": 4 + 4 * (i % 5),
            "mode": ("approx", "exact", "compare")[i % 3],
            "top_logprobs": 2,
        }
        for i in range(16)
    ]
    with httpx.Client(timeout=60) as client:
        alone = [client.post(f"{server}/v1/infer", json=r).json() for r in requests]

    def send(request):
        with httpx.Client(timeout=60) as client:
            return client.post(f"{server}/v1/infer", json=request)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(send, requests))
    for request, single, response in zip(requests, alone, together):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["k"] == request["k"] and body["mode"] == request["mode"]
        got, want = body["outputs"][0]["top_logprobs"], single["outputs"][0]["top_logprobs"]
        if request["mode"] == "approx":
            assert [a["token_id"] for a in got] == [a["token_id"] for a in want]
            assert [a["logprob"] for a in got] == pytest.approx([a["logprob"] for a in want], abs=1e-4)
        else:
            assert body["batch_size"] == 1 and got == want


def test_concurrent_completions_of_the_openai_client_each_decode_as_alone(server):
    """Completions in mode auto share decode steps when they meet: mixed prompts, lengths,
    sampling and stop strings; each answer has the tokens of the same request made alone."""
    requests = [
        dict(
            prompt=f"request {i} " * (1 + i % 4),
            max_tokens=3 + 5 * (i % 4),
            logprobs=1,
            **({"temperature": 0.8, "seed": i} if i % 3 == 0 else {}),
            **({"stop": ["zz"]} if i % 5 == 0 else {}),
        )
        for i in range(12)
    ]
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    alone = [client.completions.create(model="tiny-llama", **r) for r in requests]
    with ThreadPoolExecutor(12) as pool:
        together = list(pool.map(lambda r: client.completions.create(model="tiny-llama", **r), requests))
    for single, shared in zip(alone, together):
        assert shared.choices[0].logprobs.tokens == single.choices[0].logprobs.tokens
        assert shared.choices[0].text == single.choices[0].text
        assert shared.choices[0].finish_reason == single.choices[0].finish_reason
        assert shared.choices[0].logprobs.token_logprobs == pytest.approx(
            single.choices[0].logprobs.token_logprobs, abs=1e-4
        )


def test_metrics_after_shadow_sampled_traffic(server):
    with httpx.Client(timeout=60) as client:
        for i in range(6):
            client.post(f"{server}/v1/embeddings", json={"model": "minilm", "input": f"sentence number {i}"})
        time.sleep(1.0)
        metrics = client.get(f"{server}/metrics").text
        live = {m["id"]: m["ann_mlp"]["live"] for m in client.get(f"{server}/v1/models").json()["data"]}
    assert 'ann_mlp_shadow_samples_total{model="minilm"}' in metrics
    assert live["minilm"] is not None and 0 < live["minilm"]["recall_at_k"] <= 1


def test_sigterm_drains_in_flight_requests(tiny_stores):
    with running_server([tiny_stores["tiny-llama"]]) as (url, proc, log):
        slow = {"model": "tiny-llama", "prompt": "drain", "max_tokens": 200}

        def send(_):
            with httpx.Client(timeout=60) as client:
                return client.post(f"{url}/v1/completions", json=slow)

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(send, i) for i in range(6)]
            wait_submitted(url, 6)  # every request is queued or running
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
        # uvicorn re-raises the signal once drained, so the exit reads as a SIGTERM stop
        assert proc.wait(timeout=60) == -signal.SIGTERM
        assert "Finished server process" in log.read_text()
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health/live", timeout=2)


def test_default_relu_lm_serves_completions_to_the_openai_client(tmp_path):
    """The README's default model, trained here, built and served for real (small calibration budget)."""
    store = tmp_path / "relu-lm"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "ann_mlp",
            "build",
            "relu-lm",
            "--out",
            str(store),
            "--calib-tokens",
            "2000",
            "--k",
            "256",
            "--backend",
            "lowrank",
            # a fixed re-rank count tuned to 0.95: the margin's tuning at 0.99 costs minutes here
            "--param",
            "margin_rank=0",
            "--target-recall",
            "0.95",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    with running_server([store]) as (url, _, _log):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
        prompt = "The kernel scheduler decides which task runs next on each"
        completion = client.completions.create(model="relu-lm", prompt=prompt, max_tokens=8)
        assert completion.choices[0].text and completion.usage.completion_tokens >= 1
        info = completion.model_extra["ann_mlp"][0]
        assert info["mode"] == "auto" and 0 <= info["dense_fraction"] <= 1
        exact = client.completions.create(
            model="relu-lm", prompt=prompt, max_tokens=8, extra_body={"ann_mlp": {"mode": "exact"}}
        )
        assert exact.choices[0].text


def metric_value(url: str, sample: str) -> float:
    """The value of one Prometheus sample line (name with labels), 0 when absent."""
    for row in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if row.startswith(sample + " "):
            return float(row.split()[1])
    return 0.0


# Far more decoding than any machine finishes in a few seconds: 64 prompts x 240 new tokens, each
# decoded alone in turn (mode exact; a shared decode batch would take them 64 at a time).
LONG_COMPLETION = {
    "model": "tiny-llama",
    "prompt": [f"prompt {i}" for i in range(64)],
    "max_tokens": 240,
    "ann_mlp": {"mode": "exact"},
}


def test_a_client_that_disconnects_frees_its_work(tiny_stores):
    with running_server([tiny_stores["tiny-llama"]]) as (url, _, _log):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json=LONG_COMPLETION, timeout=httpx.Timeout(60, read=1.0))
        sample = 'ann_mlp_requests_abandoned_total{reason="disconnected"}'
        deadline = time.monotonic() + 60
        while metric_value(url, sample) < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric_value(url, sample) == 1
        # The worker is free again: the next request is answered although the abandoned one had
        # minutes of decoding left.
        quick = httpx.post(
            f"{url}/v1/completions", json={"model": "tiny-llama", "prompt": "hi", "max_tokens": 2}, timeout=60
        )
        assert quick.status_code == 200, quick.text


def test_a_drain_answers_what_cannot_finish_with_a_json_503(tiny_stores):
    with running_server([tiny_stores["tiny-llama"]], env={"ANN_MLP_DRAIN_TIMEOUT_S": "3"}) as (url, proc, _log):

        def send(_):
            with httpx.Client(timeout=120) as client:
                return client.post(f"{url}/v1/completions", json=LONG_COMPLETION)

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, i) for i in range(4)]
            wait_submitted(url, 4)
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert proc.wait(timeout=60) == -signal.SIGTERM
    cut = [r for r in responses if r.status_code == 503]
    assert cut, [r.status_code for r in responses]  # minutes of work cannot fit in a 3 s drain
    assert all(r.status_code in (200, 503) for r in responses), [r.text for r in responses]
    for response in cut:
        # shutting_down: cut short by the drain; not_ready: arrived after the drain began
        assert response.json()["error"]["code"] in ("shutting_down", "not_ready"), response.text
        assert response.headers["Retry-After"] == "1"


def test_an_unexpected_error_is_a_json_500_on_a_connection_that_stays_open(tiny_stores):
    """No route fails on purpose, so one is added that does; the keep-alive connection that met it
    carries the next request."""
    import uvicorn

    from server.app import create_app
    from server.cli import bound_socket
    from server.settings import ServerSettings

    app = create_app(ServerSettings(stores=[tiny_stores["tiny-llama"]]))

    @app.get("/fails")
    async def fails():
        raise RuntimeError("a bug")

    sock = bound_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        # A guard against a hang, not a timing: replicas that plan their stores again on their own
        # thread count take minutes on a busy machine.
        deadline = time.monotonic() + 600
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        connection = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=30)
        connection.request("GET", "/fails")
        failed = connection.getresponse()
        body = json.loads(failed.read())
        assert failed.status == 500 and body["error"]["code"] == "internal_error"
        assert failed.getheader("connection") != "close"
        first_socket = connection.sock
        connection.request("GET", "/health/live")
        live = connection.getresponse()
        assert live.status == 200 and json.loads(live.read()) == {"status": "alive"}
        assert connection.sock is first_socket  # the same connection, not a reconnect
        assert httpx.get(f"{url}/health/ready", timeout=5).status_code == 200
    finally:
        server.should_exit = True
        thread.join(timeout=30)
