"""faiss PQ fast-scan (4-bit codes, SIMD) over all keys, then exact re-rank of the best candidates.

Every key is scored, but at about 1/16 of the bytes of a float scan; the
`k_factor * k` best are re-scored exactly by IndexRefineFlat.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np

from ann_mlp.index.base import BYTES_PER_FLOAT, SearchResult
from ann_mlp.index.faiss_base import FaissIndex


def _padded_dim(dim: int, dims_per_subquantizer: int) -> int:
    # Fast-scan wants an even number of sub-quantizers that divide the dimension;
    # zero columns change no inner product, so pad with them.
    m = math.ceil(dim / dims_per_subquantizer)
    m += m % 2
    return m * dims_per_subquantizer


def _pad(x: np.ndarray, dim: int) -> np.ndarray:
    if x.shape[1] == dim:
        return x
    out = np.zeros((x.shape[0], dim), dtype=np.float32)
    out[:, : x.shape[1]] = x
    return out


class PqRefineIndex(FaissIndex):
    name = "pq"
    effort_param = "k_factor"
    exact_scores = True  # the refine stage returns full-precision scores

    def __init__(self, index, build_params, search_params) -> None:
        super().__init__(index, build_params, search_params)
        self.padded_dim = index.d
        self.dim = build_params["dim"]

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        return {"dims_per_subquantizer": 2}

    def _pad(self, x: np.ndarray) -> np.ndarray:
        return _pad(x, self.padded_dim)

    @classmethod
    def build(cls, keys: np.ndarray, **build_params: Any) -> PqRefineIndex:
        params = {**cls.default_build_params(*keys.shape), **build_params, "dim": keys.shape[1]}
        padded = _padded_dim(keys.shape[1], params["dims_per_subquantizer"])
        m = padded // params["dims_per_subquantizer"]
        base = faiss.IndexPQFastScan(padded, m, 4, faiss.METRIC_INNER_PRODUCT)
        base.pq.cp.min_points_per_centroid = 1  # 16 centroids per sub-space; few keys is expected
        index = faiss.IndexRefineFlat(base)
        padded_keys = _pad(keys, padded)
        index.train(padded_keys)
        index.add(padded_keys)
        return cls(index, params, {})

    def flat_storage(self) -> faiss.IndexFlat:
        return faiss.downcast_index(self.index.refine_index)

    def effort_range(self, k: int) -> tuple[int, int]:
        return (1, max(1, math.ceil(self.num_keys / k)))

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        k_factor = self.resolve_effort(k, search_params)
        params = faiss.IndexRefineSearchParameters(k_factor=float(k_factor))
        scores, ids = self.index.search(self._pad(queries), k, params=params)
        n_queries = queries.shape[0]
        code_bytes = self.num_keys * (self.padded_dim // self.build_params["dims_per_subquantizer"]) // 2
        rerank = min(k * k_factor, self.num_keys)
        return SearchResult(
            scores,
            ids,
            keys_scored=n_queries * self.num_keys,
            bytes_read=n_queries * (code_bytes + rerank * self.dim * BYTES_PER_FLOAT),
        )
