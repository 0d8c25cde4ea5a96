"""Benchmarks: one MLP layer dense vs approximate (timed in the same process), a real
checkpoint end to end, and the resident memory of a served store.

In the layer benchmark, weights are random (timing only: recall on random weights
says nothing about a real model). The dense baseline is the faster of torch and numpy for that shape
and batch, measured in the same run; the approximate path is the ApproxMLP the
engine runs.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import statistics
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ann_mlp.approx_mlp import ApproxMLP, augmented_keys, augmented_queries
from ann_mlp.checkpoint.base import MlpWeights
from ann_mlp.errors import InputError
from ann_mlp.index import build_index
from ann_mlp.index.base import BYTES_PER_FLOAT
from ann_mlp.linalg import rows_dot
from ann_mlp.timing import time_calls, time_in_turns


@dataclass(frozen=True)
class LayerBenchResult:
    d_model: int
    d_ff: int
    gated: bool
    batch: int
    backend: str
    k: int
    probe_fraction: float
    dense_path: str  # "torch" or "numpy": the faster one, used as the baseline
    dense_us: float  # median per call
    dense_spread_us: float  # p90 - p10
    approx_us: float
    approx_spread_us: float
    speedup: float  # dense_us / approx_us
    search_us: float  # the index's search alone, same queries
    value_sum_us: float  # the second layer's gather-and-sum of the k value rows alone
    up_rows_us: float  # gated: the k up rows' dot products alone (0 otherwise)
    overhead_us: float  # ApproxMLP's fixed per-call cost: the call with its search answered from a record,
    # less the work on the k rows (value_sum_us, up_rows_us) timed in the same repeats; median of the differences
    bytes_read_fraction: float  # approx bytes read (index + value/up rows) / dense bytes (all weights)
    repeats: int
    dense_gb_s: float  # weight bytes the dense path streams per second
    traffic_limit_speedup: float  # 1 / bytes_read_fraction: the speedup if both ran at memory speed
    note: str = "random weights: timing only"

    def to_json(self) -> dict:
        return asdict(self)


def random_layer(d_model: int, d_ff: int, gated: bool, seed: int = 0) -> MlpWeights:
    generator = torch.Generator().manual_seed(seed)
    scale = d_model**-0.5

    def rows() -> torch.Tensor:
        return torch.randn(d_ff, d_model, generator=generator) * scale  # (d_ff, d_model)

    return MlpWeights(
        keys=rows(),
        key_bias=None if gated else torch.randn(d_ff, generator=generator) * 0.1,
        values=rows(),
        out_bias=None if gated else torch.zeros(d_model),
        activation="silu" if gated else "relu",
        up=rows() if gated else None,
    )


def dense_paths(w: MlpWeights) -> dict[str, Callable[[torch.Tensor], object]]:
    """The exact MLP in torch and in numpy, both fp32, weights laid out for a plain matmul."""
    keys_t = w.keys.T.contiguous()  # (d_model, d_ff)
    values = w.values.contiguous()  # (d_ff, d_model)
    up_t = w.up.T.contiguous() if w.gated else None
    np_keys, np_values = keys_t.numpy(), values.numpy()
    np_up = up_t.numpy() if w.gated else None
    np_bias = None if w.key_bias is None else w.key_bias.numpy()

    def torch_mlp(x: torch.Tensor) -> torch.Tensor:
        h = x @ keys_t  # (B, d_ff)
        if w.gated:
            return (torch.nn.functional.silu(h) * (x @ up_t)) @ values  # (B, d_model)
        return torch.relu(h + w.key_bias) @ values + w.out_bias

    def numpy_mlp(x: torch.Tensor) -> np.ndarray:
        xn = x.numpy()
        h = xn @ np_keys  # (B, d_ff)
        if w.gated:
            return (h / (1 + np.exp(-h)) * (xn @ np_up)) @ np_values
        return np.maximum(h + np_bias, 0) @ np_values

    return {"torch": torch_mlp, "numpy": numpy_mlp}


def _summary(times: list[float]) -> tuple[float, float]:
    """(median, p90 - p10) in microseconds."""
    ordered = sorted(times)
    p10, p90 = ordered[len(ordered) // 10], ordered[(len(ordered) * 9) // 10 - 1]
    return statistics.median(ordered) * 1e6, (p90 - p10) * 1e6


def bench_layer(
    d_model: int,
    d_ff: int,
    batches: list[int],
    gated: bool = False,
    backend: str = "ivf",
    probe_fraction: float = 1 / 16,
    k: int = 128,
    repeats: int = 30,
    seed: int = 0,
    threads: int = 2,
) -> list[LayerBenchResult]:
    """One result per batch size; the layer and its index are built once."""
    torch.set_num_threads(threads)
    weights = random_layer(d_model, d_ff, gated, seed)
    # Query-aware backends learn from random queries here: this benchmark times, it does not measure recall.
    calibration = augmented_queries(torch.randn(4096, d_model, generator=torch.Generator().manual_seed(seed + 2)))
    index = build_index(backend, augmented_keys(weights), queries=calibration, k=k)
    params = {}
    if backend != "exact":
        lo, hi = index.effort_range(k)
        params = {index.effort_param: int(min(hi, max(lo, round(probe_fraction * hi))))}
    mlp = ApproxMLP(weights, index, k=k, search_params=params)
    dense_bytes = (3 if gated else 2) * d_ff * d_model * BYTES_PER_FLOAT
    rows_per_token = k * (2 if gated else 1)  # value rows, plus up rows for gated MLPs
    results = []
    for batch in batches:
        x = torch.randn(batch, d_model, generator=torch.Generator().manual_seed(seed + 1))
        dense = {name: _summary(time_calls(lambda fn=fn: fn(x), repeats)) for name, fn in dense_paths(weights).items()}
        dense_path = min(dense, key=lambda name: dense[name][0])
        with torch.inference_mode():
            mlp.stats.reset()
            approx_us, approx_spread = _summary(time_calls(lambda: mlp(x), repeats))
            parts = _approx_parts(mlp, x, params, repeats)
        approx_bytes = mlp.stats.bytes_read / max(mlp.stats.queries, 1) + rows_per_token * d_model * BYTES_PER_FLOAT
        dense_us, dense_spread = dense[dense_path]
        results.append(
            LayerBenchResult(
                d_model=d_model,
                d_ff=d_ff,
                gated=gated,
                batch=batch,
                backend=backend,
                k=k,
                probe_fraction=probe_fraction,
                dense_path=dense_path,
                dense_us=round(dense_us, 1),
                dense_spread_us=round(dense_spread, 1),
                approx_us=round(approx_us, 1),
                approx_spread_us=round(approx_spread, 1),
                speedup=round(dense_us / approx_us, 4),
                **{name: round(us, 1) for name, us in parts.items()},
                bytes_read_fraction=round(approx_bytes / dense_bytes, 4),
                repeats=repeats,
                dense_gb_s=round(dense_bytes / dense_us / 1e3, 2),
                traffic_limit_speedup=round(dense_bytes / approx_bytes, 2),
            )
        )
    return results


class _RecordedSearch:
    """Answers every query with one recorded search result: timing ApproxMLP around it times ApproxMLP's own work."""

    def __init__(self, result) -> None:
        self.result = result

    def search(self, queries: np.ndarray, k: int, **search_params) -> object:
        return self.result


def _approx_parts(mlp: ApproxMLP, x: torch.Tensor, params: dict, repeats: int) -> dict[str, float]:
    """Median µs of the approximate call's parts, each timed alone on the same query x."""
    queries = mlp.augmented(x).copy()
    index = mlp.index
    search_us = _summary(time_calls(lambda: index.search(queries, mlp.k, **params), repeats))[0]
    result = index.search(queries, mlp.k, **params)
    found = result.ids >= 0
    ids = torch.from_numpy(np.where(found, result.ids, 0))  # (N, k)
    weights = torch.from_numpy(np.where(found, result.scores, 0).astype(np.float32))  # (N, k)
    calls = {"recorded": lambda: mlp(x), "value_sum": lambda: mlp.weighted_value_sum(ids, weights)}
    if mlp.weights.gated:
        calls["up_rows"] = lambda: rows_dot(mlp.weights.up, ids, x)
    mlp.index = _RecordedSearch(result)
    try:
        times = time_in_turns(calls, repeats, warmup=5)
    finally:
        mlp.index = index
    up_rows = times.get("up_rows", [0.0] * repeats)
    # The glue is what the call costs beyond its two memory-bound parts, repeat by repeat: the
    # difference of medians of separate loops carried their noise (±10 µs on a 55 µs part).
    glue = [whole - value - up for whole, value, up in zip(times["recorded"], times["value_sum"], up_rows)]
    return {
        "search_us": search_us,
        "value_sum_us": _summary(times["value_sum"])[0],
        "up_rows_us": _summary(up_rows)[0],
        "overhead_us": statistics.median(glue) * 1e6,
    }


def streaming_bandwidth_gb_s(megabytes: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth of a large array copy (read + write), best of `repeats`, in GB/s."""
    src = np.ones(megabytes * (1 << 20) // 4, dtype=np.float32)
    dst = np.empty_like(src)
    best = min(time_calls(lambda: np.copyto(dst, src), repeats, warmup=1))
    return round(2 * src.nbytes / best / 1e9, 2)


@dataclass(frozen=True)
class EndToEndBenchResult:
    """A real checkpoint end to end: throughput of each path and the fidelity at that operating point."""

    model: str
    backend: str
    k: int
    batch: int  # sequences per forward call
    tokens: int  # real tokens per pass over the text
    text: str
    exact_tokens_per_s: float
    approx_tokens_per_s: float  # every layer approximated
    auto_tokens_per_s: float  # the build plan: dense where search does not pay
    # Median over passes of the exact pass's time over this mode's in the same turn: paired, so the
    # machine's drift between turns cancels (a ratio of medians spread 0.89-1.15 on one store).
    approx_speedup: float
    auto_speedup: float
    auto_dense_fraction: float  # share of (layer, token) pairs the plan ran dense
    recall_at_k: float  # mean over layers
    scanned_fraction: float
    bytes_read_fraction: float
    end_to_end: dict  # the core's metrics, approximate (unplanned) vs exact
    repeats: int

    def to_json(self) -> dict:
        return asdict(self)


def bench_e2e(model, batch: int, text=None, max_tokens: int = 4096, repeats: int = 4) -> EndToEndBenchResult:
    """Median of `repeats` passes over the same held-out batches per path, all in this process."""
    from ann_mlp.capture import batches, forward
    from ann_mlp.config import TextConfig
    from ann_mlp.evaluate import Comparison
    from ann_mlp.text import describe, passages

    checkpoint = model.checkpoint
    stream = list(
        batches(checkpoint, passages(text, "evaluation"), TextConfig(max_tokens=max_tokens, batch_size=batch))
    )
    tokens = sum(b.num_tokens for b in stream)
    comparison = Comparison(model)
    for b in stream:
        comparison.add(b)
    layers = comparison.layer_reports()

    def run(mode: str) -> None:
        for b in stream:
            if mode == "exact":
                forward(checkpoint, b)
            else:
                with model.approximate(planned=mode == "auto"):
                    forward(checkpoint, b)

    times = time_in_turns({mode: lambda mode=mode: run(mode) for mode in ("exact", "approx", "auto")}, repeats)
    seconds = {mode: statistics.median(mode_times) for mode, mode_times in times.items()}
    speedup = {
        mode: statistics.median(exact / other for exact, other in zip(times["exact"], times[mode]))
        for mode in ("approx", "auto")
    }
    model.reset_stats()
    run("auto")
    mlps = model.mlps.values()
    dense_tokens = sum(m.stats.dense_tokens for m in mlps)
    return EndToEndBenchResult(
        model=model.manifest.name,
        backend=model.manifest.backend,
        k=model.manifest.k,
        batch=batch,
        tokens=tokens,
        text=describe(text, "evaluation"),
        exact_tokens_per_s=round(tokens / seconds["exact"], 1),
        approx_tokens_per_s=round(tokens / seconds["approx"], 1),
        auto_tokens_per_s=round(tokens / seconds["auto"], 1),
        approx_speedup=round(speedup["approx"], 4),
        auto_speedup=round(speedup["auto"], 4),
        auto_dense_fraction=round(dense_tokens / max(1, dense_tokens + sum(m.stats.queries for m in mlps)), 4),
        recall_at_k=round(statistics.mean(layer.recall_at_k for layer in layers), 4),
        scanned_fraction=round(statistics.mean(layer.scanned_fraction for layer in layers), 4),
        bytes_read_fraction=round(statistics.mean(layer.bytes_read_fraction for layer in layers), 4),
        end_to_end=comparison.end_to_end.report(),
        repeats=repeats,
    )


@dataclass(frozen=True)
class MemoryBenchResult:
    """Resident memory a process gains by loading a checkpoint alone vs with its index store."""

    model: str
    backend: str
    dense_mb: float  # the checkpoint's model, as `exact` mode serves it
    approx_mb: float  # the same model with every layer's index and ApproxMLP (ApproxModel.open)
    ratio: float  # approx_mb / dense_mb

    def to_json(self) -> dict:
        return asdict(self)


def _resident_bytes() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so RSS counts live memory only
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _load_growth(store: str, with_indexes: bool) -> int:
    """Run in a fresh process: resident bytes gained by one load, after a warm-up load has
    paid the one-time costs (lazy imports, allocator arenas) and been freed."""
    from ann_mlp.approx_model import ApproxModel, recorded_checkpoint
    from ann_mlp.checkpoint import load_checkpoint
    from ann_mlp.store import Store

    source = recorded_checkpoint(Store.open(store))

    def load() -> object:
        return ApproxModel.open(store) if with_indexes else load_checkpoint(source)

    del_after = load()
    del del_after
    before = _resident_bytes()
    loaded = load()
    grown = _resident_bytes() - before
    del loaded
    return grown


@contextmanager
def _one_malloc_arena() -> Iterator[None]:
    """Processes started within use a single glibc malloc arena. With one arena per thread,
    the loading threads' freed buffers stayed resident at random: relu-lm alone grew a
    process by 39.0-51.9 MB, with its store by 42.7-52.2 MB (4 processes each); with one
    arena by 41.8-41.9 and 43.3-43.4 MB."""
    previous = os.environ.get("MALLOC_ARENA_MAX")
    os.environ["MALLOC_ARENA_MAX"] = "1"  # read by glibc when the spawned process starts
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MALLOC_ARENA_MAX"]
        else:
            os.environ["MALLOC_ARENA_MAX"] = previous


def bench_memory(store: Path, repeats: int = 3) -> MemoryBenchResult:
    """Each load in its own fresh process with one malloc arena, so neither sees the other's
    memory nor its allocator's leftovers; the median of `repeats` processes per side."""
    from ann_mlp.store import Store

    manifest = Store.open(store).manifest
    grown = {}
    for with_indexes in (False, True):
        runs = []
        for _ in range(repeats):
            with _one_malloc_arena(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs.append(pool.submit(_load_growth, str(store), with_indexes).result())
        grown[with_indexes] = statistics.median(runs)
    dense_mb, approx_mb = grown[False] / 2**20, grown[True] / 2**20
    if dense_mb < 1:
        raise InputError(f"{manifest.name}'s model grew the process by {dense_mb:.2f} MB: too small to measure")
    return MemoryBenchResult(
        model=manifest.name,
        backend=manifest.backend,
        dense_mb=round(dense_mb, 1),
        approx_mb=round(approx_mb, 1),
        ratio=round(approx_mb / dense_mb, 3),
    )
