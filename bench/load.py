"""Load on a served store: concurrent clients, a burst beyond the queue, and an optional soak.

    python bench/load.py                                   # 64 clients x 60 s, a 256-request burst
    python bench/load.py --soak-minutes 30                 # then 30 minutes at the queue's capacity
    python bench/load.py --write                           # and rewrite docs/results/load.md

Starts `ann-mlp serve STORE` on 127.0.0.1 (a real uvicorn process), then sends mixed traffic:
completions through the official `AsyncOpenAI` client and `/v1/infer` through httpx, in every
mode. Prints requests, status codes, transport errors (connection resets), p50/p99 latency and
the server's resident memory before and after; the soak adds the memory's slope. Latency figures
only mean something on a quiet machine; status codes and errors mean something anywhere.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.pages import REPO, commit, head  # noqa: E402

PAGE = REPO / "docs" / "results" / "load.md"
PROMPTS = [
    "The scheduler picks the next task to run on each",
    "A page fault happens when a process touches memory that",
    "To build the kernel, first configure it with",
    "Interrupt handlers must not sleep, because",
]
MODES = ("auto", "approx", "exact", "compare")


@dataclass
class Tally:
    codes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)  # transport errors by kind
    latencies: list[float] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.codes.update(other.codes)
        self.errors.update(other.errors)
        self.latencies += other.latencies

    @property
    def requests(self) -> int:
        return sum(self.codes.values()) + sum(self.errors.values())

    def summary(self) -> str:
        ordered = sorted(self.latencies)
        p50 = statistics.median(ordered) * 1e3 if ordered else float("nan")
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1e3 if ordered else float("nan")
        codes = ", ".join(f"{code}: {count}" for code, count in sorted(self.codes.items()))
        errors = ", ".join(f"{kind}: {count}" for kind, count in sorted(self.errors.items())) or "none"
        return (
            f"{self.requests} requests; status {codes}; transport errors {errors}; p50 {p50:.0f} ms, p99 {p99:.0f} ms"
        )

    @property
    def server_errors(self) -> int:
        return sum(count for code, count in self.codes.items() if code >= 500)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    store: Path, port: int, log: Path, args: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`ann-mlp serve STORE` on 127.0.0.1:port, with extra arguments and settings; once ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", str(store), "--port", str(port), *args],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 1800  # a first run builds the store
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server never became ready")


async def one_request(rng: random.Random, url: str, model: str, ai: openai.AsyncOpenAI, http: httpx.AsyncClient) -> int:
    """One request of the mix; returns its status code (transport errors raise)."""
    mode = rng.choice(MODES)
    prompt = rng.choice(PROMPTS)
    if rng.random() < 0.5:
        try:
            await ai.completions.create(
                model=model, prompt=prompt, max_tokens=rng.choice((1, 4, 8)), extra_body={"ann_mlp": {"mode": mode}}
            )
            return 200
        except openai.APIStatusError as err:
            return err.status_code
    response = await http.post(f"{url}/v1/infer", json={"model": model, "texts": [prompt], "mode": mode})
    return response.status_code


async def clients(url: str, model: str, count: int, seconds: float, seed: int) -> Tally:
    """`count` clients, each sending its next request as soon as the last is answered, for `seconds`."""
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
    async with (
        httpx.AsyncClient(timeout=120, limits=limits) as http,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120) as ai,
    ):
        end = time.monotonic() + seconds

        async def client(index: int) -> Tally:
            rng, tally = random.Random(seed * 1000 + index), Tally()
            while time.monotonic() < end:
                start = time.perf_counter()
                try:
                    tally.codes[await one_request(rng, url, model, ai, http)] += 1
                    tally.latencies.append(time.perf_counter() - start)
                except (httpx.TransportError, openai.APIConnectionError) as err:
                    tally.errors[type(err).__name__] += 1
            return tally

        total = Tally()
        for tally in await asyncio.gather(*(client(i) for i in range(count))):
            total.add(tally)
        return total


async def burst(url: str, model: str, count: int) -> Tally:
    """`count` requests at once, each on a connection of its own."""
    limits = httpx.Limits(max_connections=count)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:

        async def send(index: int) -> Tally:
            tally, start = Tally(), time.perf_counter()
            body = {"model": model, "texts": [PROMPTS[index % len(PROMPTS)]], "mode": MODES[index % len(MODES)]}
            try:
                response = await http.post(f"{url}/v1/infer", json=body)
                tally.codes[response.status_code] += 1
                tally.latencies.append(time.perf_counter() - start)
            except httpx.TransportError as err:
                tally.errors[type(err).__name__] += 1
            return tally

        total = Tally()
        for tally in await asyncio.gather(*(send(i) for i in range(count))):
            total.add(tally)
        return total


def soak(url: str, model: str, pid: int, minutes: float, count: int) -> tuple[Tally, list[tuple[float, float]]]:
    """Traffic at the queue's capacity for `minutes`, the server's memory sampled every 30 s."""
    samples, total, start = [(0.0, rss_mb(pid))], Tally(), time.monotonic()
    window = 30.0
    while time.monotonic() - start < minutes * 60:
        total.add(asyncio.run(clients(url, model, count, window, seed=len(samples))))
        samples.append(((time.monotonic() - start) / 60, rss_mb(pid)))
    return total, samples


def slope_mb_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of memory over time, past the first sample's warm-up."""
    points = samples[1:] if len(samples) > 2 else samples
    if len(points) < 2:
        return 0.0
    mean_t = statistics.mean(t for t, _ in points)
    mean_m = statistics.mean(m for _, m in points)
    covariance = sum((t - mean_t) * (m - mean_m) for t, m in points)
    variance = sum((t - mean_t) ** 2 for t, _ in points)
    return covariance / variance if variance else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=REPO / "indexes" / "relu-lm")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--burst", type=int, default=256)
    parser.add_argument("--soak-minutes", type=float, default=0.0)
    parser.add_argument("--write", action="store_true", help=f"rewrite {PAGE.relative_to(REPO)}")
    args = parser.parse_args()

    # The code that runs is the code at the start: a long soak may outlive commits.
    started_at = commit()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ann-mlp-load-{port}.log"
    proc = start_server(args.store, port, log)
    model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    lines = []
    try:
        before = rss_mb(proc.pid)
        steady = asyncio.run(clients(url, model, args.clients, args.seconds, seed=0))
        after = rss_mb(proc.pid)
        lines.append(
            f"| {args.clients} clients × {args.seconds:g} s | {steady.summary()} | {before:.0f} → {after:.0f} MB |"
        )
        print(lines[-1], flush=True)
        spike = asyncio.run(burst(url, model, args.burst))
        lines.append(f"| burst of {args.burst} at once | {spike.summary()} | {rss_mb(proc.pid):.0f} MB |")
        print(lines[-1], flush=True)
        failures = steady.server_errors + spike.server_errors + sum(steady.errors.values()) + sum(spike.errors.values())
        if args.soak_minutes > 0:
            queue = int(os.environ.get("ANN_MLP_QUEUE_SIZE", "64"))
            long_run, samples = soak(url, model, proc.pid, args.soak_minutes, queue)
            lines.append(
                f"| soak: {queue} clients × {args.soak_minutes:g} min | {long_run.summary()} | "
                f"{samples[0][1]:.0f} → {samples[-1][1]:.0f} MB, slope {slope_mb_per_minute(samples):+.2f} MB/min |"
            )
            print(lines[-1], flush=True)
            failures += long_run.server_errors + sum(long_run.errors.values())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    if args.write:
        command = "python bench/load.py " + " ".join(sys.argv[1:])
        PAGE.write_text(
            "\n".join(
                [
                    *head("Load: concurrent clients, a burst beyond the queue, a soak", command.strip(), started_at),
                    f"Store `{args.store.name}` served by `ann-mlp serve` (one worker, queue of "
                    f"{os.environ.get('ANN_MLP_QUEUE_SIZE', '64')}). Traffic: half completions (1, 4 or 8 new tokens) "
                    "through the official `AsyncOpenAI` client, half `/v1/infer` through httpx, modes auto, "
                    "approx, exact and compare in equal shares; each client sends its next request when the last "
                    "is answered. 429 is the queue refusing work it cannot take (with `Retry-After`); a "
                    "transport error would be a reset or a refused connection.",
                    "",
                    "| load | outcome | server memory (RSS) |",
                    "| --- | --- | --- |",
                    *lines,
                    "",
                ]
            )
        )
        print(f"wrote {PAGE}")
    print("server errors or transport errors:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
