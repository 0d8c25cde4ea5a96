"""Where approximation pays: per layer, dense vs approximate cost at several batch sizes.

Measured when a store is built, with real MLP inputs, recorded in the manifest, and applied at
run time (mode "auto"): a call with up to `approx_up_to` tokens is approximated, a larger one
runs the exact dense MLP. The rule is a prefix (approximate only while every measured batch
size up to there was faster approximately), so interpolating between measured sizes never
picks a path measured to be slower, and "faster" means by PLAN_MARGIN: a smaller measured
gain is within the planner's own noise.

Batch size 1 is decided inside the real model: for a causal LM, one-token MLP calls are
timed while it decodes, dense and approximate in alternate passes. A layer timed alone in a
loop keeps its weights in the processor's caches, which a decode step, reading every layer's
weights in turn, does not; so the isolated loop flatters the dense path at batch 1. The
timings depend on the machine, which the plan records: a store opened on another machine
is planned again there (`replan_if_moved`).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice

import torch

from ann_mlp.approx_mlp import ApproxMLP
from ann_mlp.approx_model import ApproxModel
from ann_mlp.capture import batch_from_ids, forward_capturing
from ann_mlp.decode import generate, pad_token_id
from ann_mlp.patch import patched
from ann_mlp.text import stdlib_passages
from ann_mlp.timing import time_calls

log = logging.getLogger(__name__)

PLAN_BATCH_SIZES = (1, 4, 16, 64)
PLAN_REPEATS = 15
PLAN_MARGIN = 0.9  # approximate where it took at most this fraction of the dense time
# Decoding timed for the batch-1 decision: prompts of calibration text, tokens decoded per prompt, passes per path.
DECODE_PROMPTS = 2
DECODE_PROMPT_TOKENS = 16
DECODE_NEW_TOKENS = 16
DECODE_PASSES = 3


def plan_layer(
    mlp: ApproxMLP, queries: torch.Tensor, batch_sizes: tuple[int, ...] = PLAN_BATCH_SIZES, repeats: int = PLAN_REPEATS
) -> dict:
    """queries (n, d_model): real MLP inputs. Returns the manifest's `plan` record for the layer, timed alone."""
    dense_us, approx_us = [], []
    with torch.inference_mode():
        for size in batch_sizes:
            x = queries[torch.arange(size) % len(queries)]  # (size, d_model)
            for times, call in ((dense_us, mlp.dense_forward), (approx_us, mlp.forward_with_selection)):
                times.append(
                    round(statistics.median(time_calls(lambda call=call, x=x: call(x), repeats, warmup=1)) * 1e6, 1)
                )
    mlp.stats.reset()
    return {
        "batch_sizes": list(batch_sizes),
        "dense_us": dense_us,
        "approx_us": approx_us,
        "approx_up_to": approx_up_to(batch_sizes, dense_us, approx_us),
    }


def approx_up_to(batch_sizes: tuple[int, ...], dense_us: list[float], approx_us: list[float]) -> int:
    """The largest batch size up to which every measured one was clearly faster approximately (0: none)."""
    up_to = 0
    for size, dense, approx in zip(batch_sizes, dense_us, approx_us):
        if approx > PLAN_MARGIN * dense:
            break
        up_to = size
    return up_to


def machine() -> dict:
    """What a plan's timings depend on: the processor, the cores, torch's threads and version."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


def planning_prompts(model: ApproxModel) -> list[list[int]]:
    """Token ids of a few calibration passages: what the model runs while it is planned."""
    tokenizer = model.checkpoint.tokenizer
    prompts = [
        tokenizer(passage, add_special_tokens=True)["input_ids"][:DECODE_PROMPT_TOKENS]
        for passage in islice(stdlib_passages("calibration"), DECODE_PROMPTS)
    ]
    return [ids for ids in prompts if len(ids) >= 2]


def plan_model(model: ApproxModel) -> dict[int, dict]:
    """Every layer's plan: batch sizes timed alone on the layer's real inputs, batch 1 (for causal
    LMs) decided by one-token calls timed inside decoding."""
    prompts = planning_prompts(model)
    _, inputs = forward_capturing(model.checkpoint, batch_from_ids(model.checkpoint, prompts), model.mlps)
    plans = {layer: plan_layer(mlp, inputs[layer]) for layer, mlp in model.mlps.items()}
    if model.checkpoint.kind == "causal_lm":
        for layer, (dense_us, approx_us) in decode_timings(model, prompts).items():
            plan = plans[layer]
            plan.update(
                decode_dense_us=dense_us,
                decode_approx_us=approx_us,
                approx_up_to=approx_up_to(
                    PLAN_BATCH_SIZES, [dense_us, *plan["dense_us"][1:]], [approx_us, *plan["approx_us"][1:]]
                ),
            )
    return plans


@contextmanager
def _call_timers(mlps: dict[int, ApproxMLP], seconds: dict[int, list[float]]) -> Iterator[None]:
    """Append each one-token call's wall time to seconds[layer]."""
    started: dict[int, float] = {}
    handles = []
    for layer, mlp in mlps.items():

        def begin(_module, args, layer=layer):
            started[layer] = time.perf_counter() if args[0].numel() == args[0].shape[-1] else None

        def finish(_module, _args, _output, layer=layer):
            if started[layer] is not None:
                seconds[layer].append(time.perf_counter() - started[layer])

        handles += [mlp.register_forward_pre_hook(begin), mlp.register_forward_hook(finish)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def decode_timings(model: ApproxModel, prompts: list[list[int]]) -> dict[int, tuple[float, float]]:
    """Per layer, median µs of its one-token MLP calls (dense, approximate) while the model decodes
    the prompts, every layer on the same path in a pass, the two paths in alternate passes."""
    checkpoint = model.checkpoint
    pad = pad_token_id(checkpoint.tokenizer)
    seconds = {path: {layer: [] for layer in model.mlps} for path in ("dense", "approx")}
    with patched(checkpoint.adapter, model.mlps), torch.inference_mode():
        for number in range(2 * DECODE_PASSES + 2):  # the first two passes warm up
            path = ("dense", "approx")[number % 2]
            for mlp in model.mlps.values():
                mlp.approx_up_to = 0 if path == "dense" else None
            timed = seconds[path] if number >= 2 else {layer: [] for layer in model.mlps}
            with _call_timers(model.mlps, timed):
                for prompt in prompts:
                    generate(checkpoint.model, [prompt], DECODE_NEW_TOKENS, eos_token_id=None, pad_token_id=pad)
    for mlp in model.mlps.values():
        mlp.approx_up_to = None
    model.reset_stats()
    return {
        layer: (
            round(statistics.median(seconds["dense"][layer]) * 1e6, 1),
            round(statistics.median(seconds["approx"][layer]) * 1e6, 1),
        )
        for layer in model.mlps
    }


def replan_if_moved(model: ApproxModel) -> bool:
    """Plan the model again, in memory, when its store was planned on another machine; True if it was."""
    if all(plan is None for plan in model.plans.values()):  # built without a plan: nothing to re-measure
        return False
    recorded = model.manifest.extra.get("plan_machine")
    here = machine()
    if recorded == here:
        return False
    log.warning("%s was planned on %s; planning it again on this machine (%s)", model.manifest.name, recorded, here)
    model.plans = plan_model(model)
    return True
