"""Exhaustive inner-product scan: the ground truth every other backend is measured against."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ann_mlp.index.base import KeyRowsIndex, SearchResult


class ExactIndex(KeyRowsIndex):
    name = "exact"
    effort_param = "none"  # nothing to tune: always scans every key

    @classmethod
    def build(cls, keys: np.ndarray, **build_params: Any) -> ExactIndex:
        return cls(keys, build_params, {})

    def effort_range(self, k: int) -> tuple[int, int]:
        return (0, 0)

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        self.resolve_effort(k, search_params)
        scores = torch.from_numpy(queries) @ self.keys.float().T  # (N, n); a 16-bit table in float32 for the call
        top = torch.topk(scores, k, dim=1)
        n_queries = queries.shape[0]
        return SearchResult(
            top.values.numpy(),
            top.indices.numpy(),
            keys_scored=n_queries * self.num_keys,
            bytes_read=n_queries * self.num_keys * self.dim * self.keys.element_size(),  # a 16-bit table: half
        )
