"""Wall-clock timers shared by the planner and the benchmarks: warm-up, repeats, calls in turns."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], repeats: int, warmup: int = 5) -> list[float]:
    """Per-call seconds after warm-up."""
    return time_in_turns({"call": fn}, repeats, warmup)["call"]


def time_in_turns(calls: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Per-call seconds of each named call, the calls taking turns within each repeat: a drift in
    the machine's speed between passes falls on all of them alike instead of on whichever ran
    last, and per-repeat differences between them cancel it.

    The turn order reverses every other repeat, so that no call always follows the same other
    one: a call right after a search pass meets faiss' OpenMP threads still spinning."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)
    return times
