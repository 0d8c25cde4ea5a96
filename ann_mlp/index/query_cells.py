"""Query-side partition ("cells"): index the queries, not the keys.

The queries are a model's hidden states, and similar contexts fire the same
neurons. At build time, k-means splits real calibration queries into cells;
each cell ranks all neurons by how often they were in its queries' exact top-k.
At search time a query goes to its nearest cell and only the first `budget`
neurons of that cell's ranking are scored exactly. The ranking is stored in
full, so `budget` is a query-time knob and the candidate sets are nested:
recall can only grow with it, which is what makes tuning by bisection valid.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch

from ann_mlp.errors import BackendError
from ann_mlp.index.base import BYTES_PER_FLOAT, KeyRowsIndex, SearchResult
from ann_mlp.linalg import best_candidates


class QueryCellsIndex(KeyRowsIndex):
    name = "cells"
    scores_rows_only = True
    effort_param = "budget"  # neurons scored exactly per query
    needs_queries = True
    parts = ("centroids", "ranking")

    def __init__(
        self,
        keys: np.ndarray,
        centroids: np.ndarray,
        ranking: np.ndarray,
        build_params: dict[str, Any],
        search_params: dict[str, Any],
    ) -> None:
        super().__init__(keys, build_params, search_params)
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32))  # (cells, D)
        self.centroid_norms = (self.centroids**2).sum(1)  # (cells,)
        self.ranking = torch.from_numpy(ranking.astype(np.int64))  # (cells, n)

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        # ~d_ff/24 cells, a power of two: 64 for d_ff = 1536 (centroids cost 4% of the keys).
        return {"cells": int(min(max(2 ** round(math.log2(num_keys / 24)), 4), 1024)), "spill": 1, "seed": 0}

    @classmethod
    def build(
        cls,
        keys: np.ndarray,
        queries: np.ndarray | None = None,
        k: int | None = None,
        target_recall: float | None = None,
        **build_params: Any,
    ) -> QueryCellsIndex:
        if queries is None or k is None:
            raise BackendError("the cells backend is built from calibration queries and k")
        params = {**cls.default_build_params(*keys.shape), **build_params, "k": int(k)}
        cells = int(min(params["cells"], max(1, len(queries) // 8)))  # enough queries per cell
        params["cells"] = cells
        kmeans = faiss.Kmeans(keys.shape[1], cells, niter=20, seed=params["seed"], verbose=False)
        kmeans.cp.min_points_per_centroid = 1
        kmeans.train(np.ascontiguousarray(queries, dtype=np.float32))
        _, nearest = kmeans.index.search(np.ascontiguousarray(queries, dtype=np.float32), params["spill"])
        key_t, query_t = torch.from_numpy(keys), torch.from_numpy(queries)
        counts = torch.zeros(cells, keys.shape[0])  # (cells, n): times a neuron was in a cell's top-k
        for start in range(0, len(queries), 1024):
            top = (query_t[start : start + 1024] @ key_t.T).topk(k, dim=1).indices  # (chunk, k)
            for column in range(params["spill"]):
                cell = torch.from_numpy(nearest[start : start + 1024, column])[:, None].expand_as(top)
                counts.index_put_((cell, top), torch.ones(top.shape), accumulate=True)
        # Ties (neurons a cell never saw) are ordered by how often they fire anywhere.
        overall = counts.sum(0) / (counts.sum() + 1)  # (n,), < 1
        ranking = torch.argsort(counts + overall, dim=1, descending=True).numpy().astype(np.int32)
        return cls(keys, kmeans.centroids, ranking, params, {})

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        budget = self.resolve_effort(k, search_params)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (N, D)
        cell = (self.centroid_norms - 2 * q @ self.centroids.T).argmin(dim=1)  # (N,) nearest in L2
        candidates = self.ranking[cell, :budget]  # (N, budget)
        values, ids = best_candidates(self.keys, candidates, q, k)
        n_queries = len(q)
        per_query = (len(self.centroids) * BYTES_PER_FLOAT + budget * self.keys.element_size()) * self.dim
        return SearchResult(
            values.numpy(), ids.numpy(), keys_scored=n_queries * budget, bytes_read=round(n_queries * per_query)
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids.numpy(), "ranking": self.ranking.numpy().astype(np.int32)}
