"""Search-effort tuning: the smallest effort whose recall@k reaches a target (binary search)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ann_mlp.metrics import recall_at_k

if TYPE_CHECKING:  # the index package's own fits bisect with smallest_reaching
    from ann_mlp.index import MipsIndex


@dataclass(frozen=True)
class OperatingPoint:
    effort: int
    recall: float  # mean recall@k
    scanned_fraction: float  # keys scored / (queries * num_keys)
    bytes_read_fraction: float  # index bytes read / (queries * full-scan bytes)


def measure(
    index: MipsIndex, queries: np.ndarray, exact_scores: torch.Tensor, k: int, effort: int | None = None
) -> OperatingPoint:
    """queries (N, D) augmented; exact_scores (N, num_keys) ground truth."""
    params = {} if effort is None else {index.effort_param: effort}
    result = index.search(queries, k, **params)
    recall = recall_at_k(exact_scores, torch.from_numpy(result.ids), k).mean().item()
    n = queries.shape[0]
    used = index.resolve_effort(k, params)
    return OperatingPoint(
        used, recall, result.keys_scored / (n * index.num_keys), result.bytes_read / (n * index.full_scan_bytes)
    )


def tune_effort(
    index: MipsIndex, queries: np.ndarray, exact_scores: torch.Tensor, k: int, target_recall: float
) -> OperatingPoint:
    """Smallest effort in the backend's range with mean recall >= target (the largest if none reaches it).

    Recall is monotone in effort for every backend here (more lists, wider
    beam, more re-ranked candidates), which is what makes bisection valid.
    """
    lo, hi = index.effort_range(k)
    points = {hi: measure(index, queries, exact_scores, k, hi)}
    if points[hi].recall < target_recall:
        return points[hi]

    def reaches(effort: int) -> bool:
        points[effort] = measure(index, queries, exact_scores, k, effort)
        return points[effort].recall >= target_recall

    return points[smallest_reaching(lo, hi, reaches)]


def smallest_reaching(lo: int, hi: int, reaches: Callable[[int], bool]) -> int:
    """The smallest value in [lo, hi] where the monotone predicate `reaches` holds (hi when only
    hi might): bisection, so `reaches` is asked only of values below hi and of its result."""
    while lo < hi:
        mid = (lo + hi) // 2
        if reaches(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo
