"""Throughput under concurrent clients: the serial engine against batched serving, side by side.

    python bench/throughput.py                   # minilm embeddings and relu-lm completions, 16 clients
    python bench/throughput.py --write           # and rewrite docs/results/throughput.md

Each configuration is a real `ann-mlp serve` process on 127.0.0.1, started in turn (never two at
once), warmed up, then driven for --seconds by closed-loop clients of the official `AsyncOpenAI`
client: each sends its next request when the last is answered. "serial" is the engine with
merging off (ANN_MLP_MAX_BATCH_INPUTS=1: one request's inputs per forward pass, one completion
decoding at a time); "batched" is the default. Ratios are to serial, measured in the same run;
only a quiet machine gives meaningful figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.load import free_port, start_server  # noqa: E402
from bench.pages import REPO, commit, write_table_page  # noqa: E402

PAGE = REPO / "docs" / "results" / "throughput.md"
SENTENCES = [
    "The scheduler picks the next task to run on each CPU.",
    "A page fault happens when a process touches memory that is not mapped.",
    "Interrupt handlers must not sleep.",
    "To build the kernel, first configure it, then run make with the number of jobs you want.",
]


@dataclass(frozen=True)
class Workload:
    name: str
    store: str
    new_tokens: int  # 0: embeddings


@dataclass(frozen=True)
class Setup:
    name: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    replicas: int = 1
    clients: int | None = None  # None: --clients


WORKLOADS = {
    "embeddings": Workload("minilm embeddings, one sentence each", "minilm", 0),
    "completions": Workload("relu-lm completions, 32 new tokens", "relu-lm", 32),
}


def setups(replica_clients: int) -> list[Setup]:
    return [
        Setup("serial", env=(("ANN_MLP_MAX_BATCH_INPUTS", "1"),)),
        Setup("batched"),
        Setup("Ray Serve, 1 replica", ("--replicas", "1"), clients=replica_clients),
        Setup("Ray Serve, 2 replicas", ("--replicas", "2"), replicas=2, clients=replica_clients),
    ]


async def drive(url: str, model: str, workload: Workload, clients: int, seconds: float) -> tuple[list[float], int]:
    """Closed-loop clients for `seconds`: latencies of answered requests, and failures."""
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as ai:
        end = time.monotonic() + seconds
        latencies: list[float] = []
        failures = 0

        async def client(index: int) -> None:
            nonlocal failures
            turn = 0
            while time.monotonic() < end:
                text = SENTENCES[(index + turn) % len(SENTENCES)]
                turn += 1
                start = time.perf_counter()
                try:
                    if workload.new_tokens:
                        await ai.completions.create(model=model, prompt=text, max_tokens=workload.new_tokens)
                    else:
                        await ai.embeddings.create(model=model, input=text)
                except (openai.APIStatusError, openai.APIConnectionError):
                    failures += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(client(i) for i in range(clients)))
        return latencies, failures


def measure(workload: Workload, setup: Setup, clients: int, seconds: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ann-mlp-throughput-{port}.log"
    proc = start_server(REPO / "indexes" / workload.store, port, log, setup.args, dict(setup.env))
    try:
        while httpx.get(f"{url}/health/ready", timeout=30).json().get("replicas") != setup.replicas:
            time.sleep(0.5)  # every replica up before the clock starts
        asyncio.run(drive(url, workload.store, workload, clients, min(5.0, seconds)))  # warm up
        latencies, failures = asyncio.run(drive(url, workload.store, workload, clients, seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    ordered = sorted(latencies)
    return {
        "requests_per_s": len(ordered) / seconds,
        "p50_ms": statistics.median(ordered) * 1e3,
        "p99_ms": ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3,
        "failures": failures,
        "requests": len(ordered),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument(
        "--setups", nargs="+", choices=[s.name for s in setups(0)], default=None, help="rows to run (default: all)"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--replica-clients", type=int, default=32, help="clients for the Ray Serve rows")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--write", action="store_true", help=f"rewrite {PAGE.relative_to(REPO)}")
    args = parser.parse_args()
    started_at = commit()
    rows, failures = [], 0
    for key in args.workloads:
        workload = WORKLOADS[key]
        serial = None
        for setup in setups(args.replica_clients):
            if args.setups and setup.name not in args.setups:
                continue
            clients = setup.clients or args.clients
            result = measure(workload, setup, clients, args.seconds)
            serial = serial or result
            failures += result["failures"]
            rows.append(
                f"| {workload.name} | {setup.name} | {clients} | {result['requests']} | {result['requests_per_s']:.1f} | "
                f"{result['requests_per_s'] / serial['requests_per_s']:.2f}× | {result['p50_ms']:.0f} | "
                f"{result['p99_ms']:.0f} | {result['failures']} |"
            )
            print(rows[-1], flush=True)
    if args.write:
        write_table_page(
            PAGE,
            "Throughput: serial against batched serving",
            started_at,
            f"Closed-loop clients of the official `AsyncOpenAI` client for {args.seconds:g} s per row, after "
            "a warm-up; each configuration a real `ann-mlp serve` process, started in turn. serial: "
            "`ANN_MLP_MAX_BATCH_INPUTS=1` (each request's own forward pass, one completion decoding at a "
            "time); batched: the default (compatible requests share passes and decode steps); Ray Serve: "
            "`--replicas N` on a local Ray instance, each replica batching, on cores // N torch threads. "
            "Mode auto throughout. On 2 cores two replicas share the cores one process already uses: "
            "the cores, not the code, bound what a second replica adds here.",
            ["workload", "serving", "clients", "requests", "requests/s", "vs serial", "p50 ms", "p99 ms", "failed"],
            rows,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
