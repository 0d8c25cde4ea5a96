"""faiss IVF-Flat with inner product: k-means lists over the keys, probe `nprobe` of them.

The lists' keys live in one table in list order, which is lent to the model: its neurons are
put in the same order (ApproxModel.open), so the keys are held once."""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch

from ann_mlp.index.base import BYTES_PER_FLOAT, SearchResult
from ann_mlp.index.faiss_base import FaissIndex


class IvfIndex(FaissIndex):
    name = "ivf"
    effort_param = "nprobe"
    exact_scores = True  # IVF-Flat scores the candidates at full precision

    def __init__(self, index, build_params, search_params) -> None:
        super().__init__(index, build_params, search_params)
        self.ivf = faiss.extract_index_ivf(index)
        self._params: dict[int, faiss.SearchParametersIVF] = {}  # per nprobe: built once, not per call
        # Keys per list: the keys a probe of those lists scores (what faiss' ndis counts).
        self.list_sizes = np.array([self.ivf.invlists.list_size(i) for i in range(self.ivf.nlist)], dtype=np.int64)
        self._order, self._table = _lists_in_one_table(self.ivf, self.list_sizes)

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        # ~1.5 sqrt(n) lists, a power of two: 64 lists of 24 keys for d_ff = 1536.
        nlist = 2 ** round(math.log2(1.5 * math.sqrt(num_keys)))
        return {"nlist": int(min(max(nlist, 4), num_keys))}

    @classmethod
    def build(cls, keys: np.ndarray, **build_params: Any) -> IvfIndex:
        params = {**cls.default_build_params(*keys.shape), **build_params}
        quantizer = faiss.IndexFlatIP(keys.shape[1])
        index = faiss.IndexIVFFlat(quantizer, keys.shape[1], params["nlist"], faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # MLPs have few keys per list; that is expected
        index.train(keys)
        index.add(keys)
        return cls(index, params, {})

    def effort_range(self, k: int) -> tuple[int, int]:
        return (1, self.ivf.nlist)

    def key_table(self) -> torch.Tensor:
        return torch.from_numpy(self._table)

    def table_order(self) -> np.ndarray:
        return self._order

    def _search_params(self, nprobe: int) -> faiss.SearchParametersIVF:
        if nprobe not in self._params:
            self._params[nprobe] = faiss.SearchParametersIVF(nprobe=nprobe)
        return self._params[nprobe]

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        nprobe = self.resolve_effort(k, search_params)
        n_queries = queries.shape[0]
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        # Assign, then scan the assigned lists: the same work as search(), counted from the
        # lists probed instead of faiss' global counters (safe under concurrency). The C
        # entry points skip the Python wrappers' per-call checks and copies.
        centroid_scores = np.empty((n_queries, nprobe), dtype=np.float32)
        lists = np.empty((n_queries, nprobe), dtype=np.int64)
        self.ivf.quantizer.search_c(
            n_queries, faiss.swig_ptr(queries), nprobe, faiss.swig_ptr(centroid_scores), faiss.swig_ptr(lists)
        )
        scores = np.empty((n_queries, k), dtype=np.float32)
        ids = np.empty((n_queries, k), dtype=np.int64)
        # search_preassigned threads only over what parallel_mode names (mode 0 is threaded by
        # search(), which this bypasses): one query's lists (1), or the queries (3). Measured at
        # 4096x16384 with 1/16 of the lists, 2 threads: batch 1 0.84 -> 0.48 ms, batch 16 13.4 -> 8.4 ms.
        self.ivf.parallel_mode = 1 if n_queries == 1 else 3
        self.ivf.search_preassigned_c(
            n_queries,
            faiss.swig_ptr(queries),
            k,
            faiss.swig_ptr(lists),
            faiss.swig_ptr(centroid_scores),
            faiss.swig_ptr(scores),
            faiss.swig_ptr(ids),
            False,
            self._search_params(nprobe),
            None,
        )
        keys_scored = int(self.list_sizes[lists].sum())
        centroid_count = n_queries * self.ivf.nlist
        return SearchResult(scores, ids, keys_scored, (keys_scored + centroid_count) * self.dim * BYTES_PER_FLOAT)


def _lists_in_one_table(ivf: faiss.IndexIVF, list_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move the lists' keys into one contiguous table, each list becoming a view of its rows.

    Returns (order (n,) int64: the key in each row, table (n, D) float32 in list order). faiss'
    search reads the same bytes as before, now in one allocation the model can share; the lists
    do not own the table, so the index must keep it alive (IvfIndex does).
    """
    lists = faiss.downcast_InvertedLists(ivf.invlists)  # IVF-Flat: ArrayInvertedLists, one key per code
    row_bytes = lists.code_size
    table = np.empty((ivf.ntotal, ivf.d), dtype=np.float32)  # (n, D)
    table_bytes = table.view(np.uint8).reshape(-1)
    order = np.empty(ivf.ntotal, dtype=np.int64)
    # An empty owner, read from a vector kept alive while it is copied: the table's lifetime is
    # the Python side's business.
    empty = faiss.MaybeOwnedVectorUInt8()
    views, start = faiss.MaybeOwnedVectorUInt8Vector(), 0
    for i, size in enumerate(int(size) for size in list_sizes):
        if size == 0:
            views.push_back(faiss.MaybeOwnedVectorUInt8())
            continue
        order[start : start + size] = faiss.rev_swig_ptr(lists.get_ids(i), size)
        rows = table_bytes[start * row_bytes : (start + size) * row_bytes]
        rows[:] = faiss.rev_swig_ptr(lists.get_codes(i), len(rows))
        views.push_back(faiss.MaybeOwnedVectorUInt8.create_view(faiss.swig_ptr(rows), len(rows), empty.owner))
        start += size
    lists.codes.swap(views)  # the lists' own buffers leave with `views`
    return order, table
