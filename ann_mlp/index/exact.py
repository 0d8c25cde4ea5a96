"""Exhaustive inner-product scan: the ground truth every other backend is measured against."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ann_mlp.index.base import MipsIndex, SearchResult


class ExactIndex(MipsIndex):
    name = "exact"
    effort_param = "none"  # nothing to tune: always scans every key
    exact_scores = True

    def __init__(self, keys: np.ndarray, build_params: dict[str, Any],
                 search_params: dict[str, Any]) -> None:
        super().__init__(keys.shape[0], keys.shape[1], build_params, search_params)
        self.keys = torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32))  # (n, D)

    @classmethod
    def build(cls, keys: np.ndarray, **build_params: Any) -> ExactIndex:
        return cls(keys, build_params, {})

    def effort_range(self, k: int) -> tuple[int, int]:
        return (0, 0)

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        self.resolve_effort(k, search_params)
        scores = torch.from_numpy(queries) @ self.keys.T  # (N, n)
        top = torch.topk(scores, k, dim=1)
        n_queries = queries.shape[0]
        return SearchResult(top.values.numpy(), top.indices.numpy(),
                            keys_scored=n_queries * self.num_keys,
                            bytes_read=n_queries * self.full_scan_bytes)

    def save(self, folder: Path, stem: str) -> list[str]:
        name = f"{stem}.npy"
        np.save(folder / name, self.keys.numpy(), allow_pickle=False)
        return [name]

    @classmethod
    def load(cls, folder, stem, num_keys, dim, build_params, search_params) -> ExactIndex:
        keys = np.load(folder / f"{stem}.npy", allow_pickle=False)
        assert keys.shape == (num_keys, dim), keys.shape
        return cls(keys, build_params, search_params)
