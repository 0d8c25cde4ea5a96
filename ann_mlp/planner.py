"""Where approximation pays: per layer, dense vs approximate cost at several batch sizes.

Measured at build time on the build machine with real calibration hidden states,
recorded in the manifest, and applied at run time (mode "auto"): a call with up to
`approx_up_to` tokens is approximated, a larger one runs the exact dense MLP. The
rule is a prefix (approximate only while every measured batch size up to there
was faster approximately), so interpolating between measured sizes never picks a
path measured to be slower, and "faster" means by PLAN_MARGIN: a smaller measured
gain is within the planner's own noise (relu-lm's layer 1 at batch 1, dense ~200 µs,
measured 105.7 µs approximate in one build and 195.2 µs in another).
"""

from __future__ import annotations

import statistics

import torch

from ann_mlp.approx_mlp import ApproxMLP
from ann_mlp.benchmark import time_calls

PLAN_BATCH_SIZES = (1, 4, 16, 64)
PLAN_REPEATS = 15
PLAN_MARGIN = 0.9  # approximate where it took at most this fraction of the dense time


def plan_layer(mlp: ApproxMLP, queries: torch.Tensor, batch_sizes: tuple[int, ...] = PLAN_BATCH_SIZES,
               repeats: int = PLAN_REPEATS) -> dict:
    """queries (n, d_model): real MLP inputs. Returns the manifest's `plan` record for the layer."""
    dense_us, approx_us = [], []
    with torch.inference_mode():
        for size in batch_sizes:
            x = queries[torch.arange(size) % len(queries)]  # (size, d_model)
            for times, call in ((dense_us, mlp.dense_forward), (approx_us, mlp.forward_with_selection)):
                times.append(round(statistics.median(time_calls(lambda call=call, x=x: call(x), repeats, warmup=1)) * 1e6, 1))
    mlp.stats.reset()
    return {"batch_sizes": list(batch_sizes), "dense_us": dense_us, "approx_us": approx_us,
            "approx_up_to": approx_up_to(batch_sizes, dense_us, approx_us)}


def approx_up_to(batch_sizes: tuple[int, ...], dense_us: list[float], approx_us: list[float]) -> int:
    """The largest batch size up to which every measured one was clearly faster approximately (0: none)."""
    up_to = 0
    for size, dense, approx in zip(batch_sizes, dense_us, approx_us):
        if approx > PLAN_MARGIN * dense:
            break
        up_to = size
    return up_to
