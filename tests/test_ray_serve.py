"""Ray Serve on a real local Ray instance, started once for this module by the test process:
`ann-mlp serve --replicas 2 --ray-address` joining it (the official openai client, live replica
counts, 429 once every replica is full), and a model served as layer groups on it."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from tests.test_server_e2e import running_server

QUEUE = 8  # per replica: room for the concurrency test (8 at a time), small enough for a burst to fill


@pytest.fixture(scope="module")
def cluster():
    """A local Ray head on 127.0.0.1 (4 logical CPUs: two replicas and two layer groups fit)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def replicas(cluster, tiny_stores):
    stores = [tiny_stores["tiny-llama"], tiny_stores["tiny-bert"]]
    settings = {"ANN_MLP_QUEUE_SIZE": str(QUEUE), "ANN_MLP_TORCH_THREADS": "1"}
    args = ("--replicas", "2", "--ray-address", cluster)
    with running_server(stores, *args, env=settings, stop=stop_gracefully) as (url, _proc, _log):
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/health/ready", timeout=10).json().get("replicas") != 2:
            assert time.monotonic() < deadline, "the second replica never came up"
            time.sleep(0.3)
        yield url


def stop_gracefully(proc: subprocess.Popen) -> None:
    """SIGTERM, so the server shuts Ray down with it (a killed driver would leave Ray running)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_health_and_models_report_the_live_replicas(replicas):
    ready = httpx.get(f"{replicas}/health/ready", timeout=10).json()
    assert ready == {"status": "ready", "models": ["tiny-llama", "tiny-bert"], "replicas": 2}
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused")
    assert {m.id for m in client.models.list()} == {"tiny-llama", "tiny-bert"}
    assert httpx.get(f"{replicas}/v1/models", timeout=10).json()["replicas"] == 2


def test_replicas_answer_the_openai_client_as_one_process_does(replicas, tiny_stores):
    """Concurrent completions and embeddings through Ray Serve's proxy: every one answered, the
    greedy exact tokens those of a single process on the same thread count."""
    prompts = [f"prompt number {i}" for i in range(8)]
    ai = openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused", max_retries=0)

    def complete(prompt: str):
        return ai.completions.create(
            model="tiny-llama", prompt=prompt, max_tokens=6, logprobs=0, extra_body={"ann_mlp": {"mode": "exact"}}
        )

    def embed(prompt: str):
        return ai.embeddings.create(model="tiny-bert", input=prompt)

    with ThreadPoolExecutor(8) as pool:
        completions = list(pool.map(complete, prompts))
        embeddings = list(pool.map(embed, prompts))
    stores = [tiny_stores["tiny-llama"], tiny_stores["tiny-bert"]]
    with TestClient(create_app(ServerSettings(stores=stores, torch_threads=1))) as alone:
        for prompt, completion in zip(prompts, completions):
            body = {
                "model": "tiny-llama",
                "prompt": prompt,
                "max_tokens": 6,
                "logprobs": 0,
                "ann_mlp": {"mode": "exact"},
            }
            single = alone.post("/v1/completions", json=body).json()
            assert completion.choices[0].logprobs.tokens == single["choices"][0]["logprobs"]["tokens"]
    assert all(len(e.data[0].embedding) == 32 for e in embeddings)


def test_a_burst_beyond_every_replicas_queue_gets_429_with_retry_after(replicas):
    slow = {"model": "tiny-llama", "prompt": "x", "max_tokens": 200, "ann_mlp": {"mode": "exact"}}

    def send(_):
        # A guard against a hang: the accepted requests decode one after another, minutes on a busy machine.
        with httpx.Client(timeout=600) as client:
            return client.post(f"{replicas}/v1/completions", json=slow)

    with ThreadPoolExecutor(64) as pool:
        responses = list(pool.map(send, range(64)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429} and statuses[0] == 200 and statuses[-1] == 429, statuses
    for refused in (r for r in responses if r.status_code == 429):
        assert refused.headers["retry-after"] == "1"  # Ray's refusal: every replica's queue is full


def test_a_model_in_two_layer_groups_decodes_as_one_process(replicas, tiny_stores):
    """Each group a Ray Serve application of its own beside the replicas (the server keeps its
    own application only); the pipeline's greedy tokens equal the whole model's."""
    from ann_mlp.approx_model import ApproxModel
    from ann_mlp.decode import generate
    from ann_mlp.layer_groups import pipeline_generate
    from server.layer_groups import deploy_groups, remove_groups

    store = tiny_stores["tiny-llama"]
    prompt = [5, 9, 14, 20]
    approx = ApproxModel.open(store)
    with approx.approximate():
        (whole,) = generate(approx.checkpoint.model, [prompt], 8, eos_token_id=None, pad_token_id=0)
    groups = deploy_groups(store, 2, mode="approx", cpus_per_group=0.5)
    try:
        assert pipeline_generate(groups, prompt, 8) == whole.tokens
    finally:
        remove_groups(store, 2)
    assert httpx.get(f"{replicas}/health/ready", timeout=10).json()["replicas"] == 2  # the replicas carry on
