"""faiss HNSW-Flat with inner product: a proximity graph walked with beam width efSearch."""

from __future__ import annotations

from typing import Any

import faiss
import numpy as np

from ann_mlp.index.base import BYTES_PER_FLOAT, SearchResult
from ann_mlp.index.faiss_base import FaissIndex


class HnswIndex(FaissIndex):
    name = "hnsw"
    effort_param = "efSearch"
    exact_scores = True

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        return {"M": 32, "efConstruction": 200}

    @classmethod
    def build(cls, keys: np.ndarray, **build_params: Any) -> HnswIndex:
        params = {**cls.default_build_params(*keys.shape), **build_params}
        index = faiss.IndexHNSWFlat(keys.shape[1], params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
        index.add(keys)
        return cls(index, params, {})

    def flat_storage(self) -> faiss.IndexFlat:
        return faiss.downcast_index(self.index.storage)

    def effort_range(self, k: int) -> tuple[int, int]:
        return (k, max(k, self.num_keys))

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        ef = self.resolve_effort(k, search_params)
        # faiss counts HNSW distance computations only in a global; searches are
        # serialised per index by the caller, so reading it around one call is exact.
        faiss.cvar.hnsw_stats.reset()
        scores, ids = self.index.search(queries, k, params=faiss.SearchParametersHNSW(efSearch=ef))
        keys_scored = int(faiss.cvar.hnsw_stats.ndis)
        # Graph links read per visited node (M neighbour ids of 4 bytes) are counted too.
        link_bytes = keys_scored * self.build_params["M"] * 4
        return SearchResult(scores, ids, keys_scored, keys_scored * self.dim * BYTES_PER_FLOAT + link_bytes)
