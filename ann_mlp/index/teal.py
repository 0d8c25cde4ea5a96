"""TEAL-style input sparsity (Liu et al. 2024, "Training-free activation sparsity"), as a peer.

TEAL saves on the first layer by reading only the key columns of the query's
largest-magnitude input coordinates: scores ≈ K[:, kept] x[kept] + b. Here the
`kept_dims` largest |x_j| per token are kept (the bias column always is), every
neuron gets that partial score, the top k by partial score are chosen, and those
k keys are scored exactly. Cost: the kept columns of all keys plus k full rows.
kept_dims = D is an exhaustive exact search.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ann_mlp.index.base import KeyRowsIndex, SearchResult
from ann_mlp.linalg import best_candidates


class InputSparsityIndex(KeyRowsIndex):
    name = "teal"
    effort_param = "kept_dims"  # input coordinates kept per query, bias included

    @classmethod
    def build(cls, keys: np.ndarray, **build_params: Any) -> InputSparsityIndex:
        return cls(keys, build_params, {})

    def effort_range(self, k: int) -> tuple[int, int]:
        return (1, self.dim)

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        kept = self.resolve_effort(k, search_params)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (N, D)
        magnitude = q.abs()
        magnitude[:, -1] = torch.inf  # the bias column [b_i] · 1 is always read
        dropped = magnitude.topk(self.dim - kept, dim=1, largest=False).indices  # (N, D - kept)
        sparse_q = q.scatter(1, dropped, 0.0)  # (N, D)
        first_pass = sparse_q @ self.keys.float().T  # (N, n); a 16-bit table in float32 for the call
        candidates = first_pass.topk(min(k, self.num_keys), dim=1).indices  # (N, k)
        values, ids = best_candidates(self.keys, candidates, q, k)
        per_query = (self.num_keys * kept + ids.shape[1] * self.dim) * self.keys.element_size()
        return SearchResult(
            values.numpy(), ids.numpy(), keys_scored=len(q) * self.num_keys, bytes_read=len(q) * per_query
        )
