"""Latency of the HTTP service: p50/p99 at 1 and 8 concurrent clients, approximate vs exact mode.

Starts `ann-mlp serve STORE` on a free loopback port, warms it up, then sends a
bounded number of requests of real text (held-out standard-library docstrings)
per (mode, concurrency). Run it on a quiet machine: any other load on the two
cores invalidates the figures.

    python bench/serve_latency.py [--store indexes/minilm] [--requests 200] [--json results/serve_latency.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import httpx
import numpy as np

from ann_mlp.text import stdlib_passages

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.load import free_port, start_server  # noqa: E402


def measure(url: str, model: str, kind: str, texts: list[str], mode: str, concurrency: int) -> dict:
    route, field = ("/v1/embeddings", "input") if kind == "encoder" else ("/v1/completions", "prompt")
    extra = {"max_tokens": 1} if kind == "causal_lm" else {"encoding_format": "float"}

    def one(text: str) -> float:
        body = {"model": model, field: text, "ann_mlp": {"mode": mode}, **extra}
        start = time.perf_counter()
        response = client.post(url + route, json=body)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        return elapsed

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        for text in texts[:5]:  # warm-up, not recorded
            one(text)
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = np.array(list(pool.map(one, texts))) * 1e3
        wall = time.perf_counter() - start
    return {
        "model": model,
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(texts),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
        "mean_ms": round(float(latencies.mean()), 2),
        "throughput_rps": round(len(texts) / wall, 2),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=Path("indexes/minilm"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", type=Path, default=Path("results/serve_latency.jsonl"))
    args = parser.parse_args(argv)
    manifest = json.loads((args.store / "manifest.json").read_text())
    texts = [t[:400] for t in islice(stdlib_passages("evaluation"), args.requests)]
    port = free_port()
    proc = start_server(args.store, port, Path(os.environ.get("TMPDIR", "/tmp")) / f"ann-mlp-latency-{port}.log")
    url = f"http://127.0.0.1:{port}"
    records = []
    try:
        for concurrency in args.concurrency:
            for mode in ("approx", "exact"):
                records.append(measure(url, manifest["name"], manifest["kind"], texts, mode, concurrency))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"{'model':<10} {'mode':<7} {'clients':>7} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    for r in records:
        print(
            f"{r['model']:<10} {r['mode']:<7} {r['concurrency']:>7} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['throughput_rps']:>7.1f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "a") as f:
        for r in records:
            f.write(json.dumps({**r, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
