"""Search-effort tuning: the smallest effort whose recall@k reaches a target (binary search)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ann_mlp.index import MipsIndex
from ann_mlp.metrics import recall_at_k


@dataclass(frozen=True)
class OperatingPoint:
    effort: int
    recall: float  # mean recall@k
    scanned_fraction: float  # keys scored / (queries * num_keys)
    bytes_read_fraction: float  # index bytes read / (queries * full-scan bytes)


def measure(index: MipsIndex, queries: np.ndarray, exact_scores: torch.Tensor, k: int,
            effort: int | None = None) -> OperatingPoint:
    """queries (N, D) augmented; exact_scores (N, num_keys) ground truth."""
    params = {} if effort is None else {index.effort_param: effort}
    result = index.search(queries, k, **params)
    recall = recall_at_k(exact_scores, torch.from_numpy(result.ids), k).mean().item()
    n = queries.shape[0]
    used = index.resolve_effort(k, params)
    return OperatingPoint(used, recall, result.keys_scored / (n * index.num_keys),
                          result.bytes_read / (n * index.full_scan_bytes))


def tune_effort(index: MipsIndex, queries: np.ndarray, exact_scores: torch.Tensor, k: int,
                target_recall: float) -> OperatingPoint:
    """Smallest effort in the backend's range with mean recall >= target (the largest if none reaches it).

    Recall is monotone in effort for every backend here (more lists, wider
    beam, more re-ranked candidates), which is what makes bisection valid.
    """
    lo, hi = index.effort_range(k)
    best = measure(index, queries, exact_scores, k, hi)
    if best.recall < target_recall:
        return best
    while lo < hi:
        mid = (lo + hi) // 2
        point = measure(index, queries, exact_scores, k, mid)
        if point.recall >= target_recall:
            hi, best = mid, point
        else:
            lo = mid + 1
    return best
