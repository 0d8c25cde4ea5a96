"""Where approximation pays: per layer, dense vs approximate cost at several batch sizes.

Measured at build time on the build machine with real calibration hidden states,
recorded in the manifest, and applied at run time (mode "auto"): a call with up to
`approx_up_to` tokens is approximated, a larger one runs the exact dense MLP. The
rule is a prefix (approximate only while every measured batch size up to there
was faster approximately), so interpolating between measured sizes never picks a
path measured to be slower.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from ann_mlp.approx_mlp import ApproxMLP

PLAN_BATCH_SIZES = (1, 4, 16, 64)
PLAN_REPEATS = 15


def median_us(call: Callable[[], object], repeats: int) -> float:
    """Median wall time of `call` in microseconds, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def plan_layer(mlp: ApproxMLP, queries: torch.Tensor, batch_sizes: tuple[int, ...] = PLAN_BATCH_SIZES,
               repeats: int = PLAN_REPEATS) -> dict:
    """queries (n, d_model): real MLP inputs. Returns the manifest's `plan` record for the layer."""
    dense_us, approx_us = [], []
    with torch.inference_mode():
        for size in batch_sizes:
            x = queries[torch.arange(size) % len(queries)]  # (size, d_model)
            dense_us.append(round(median_us(lambda: mlp.dense_forward(x), repeats), 1))
            approx_us.append(round(median_us(lambda: mlp.forward_with_selection(x), repeats), 1))
    mlp.stats.reset()
    approx_up_to = 0
    for size, dense, approx in zip(batch_sizes, dense_us, approx_us):
        if approx >= dense:
            break
        approx_up_to = size
    return {"batch_sizes": list(batch_sizes), "dense_us": dense_us, "approx_us": approx_us,
            "approx_up_to": approx_up_to}
