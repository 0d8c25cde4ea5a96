"""ScaNN (optional extra `scann`): k-means leaves, anisotropic 4-bit scoring, re-order.

Build parameter `soar_lambda` (default off) turns on SOAR spilling (Sun et al. 2023):
each key is also stored in a second leaf chosen so that its residual is nearly
orthogonal to the first one's, so a query whose best key sits badly in its primary
leaf still finds it; larger lambda, more orthogonal.

Build parameter `reorder_bits`: ScaNN re-orders its candidates from its own copy of
the keys, which the model cannot share. At 8 (the default) that copy is ScaNN's
int8 one, a quarter of the keys' memory, and the k it returns are scored exactly
from the model's own keys; at 32 the copy is float32, and the model holds the keys twice.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ann_mlp.errors import BackendError
from ann_mlp.index.base import BYTES_PER_FLOAT, MipsIndex, SearchResult

ASSETS = "scann_assets.pbtxt"


def _scann():
    try:
        from scann.scann_ops.py import scann_ops_pybind
    except ImportError as err:
        raise BackendError("the scann backend needs the optional extra: pip install 'ann-mlp[scann]'") from err
    return scann_ops_pybind


class ScannIndex(MipsIndex):
    name = "scann"
    effort_param = "leaves_to_search"
    exact_scores = True  # the re-order stage scores candidates at full precision

    def __init__(self, searcher, keys: np.ndarray, build_params, search_params) -> None:
        """keys: (num_keys, D) float32, the checkpoint's; kept (not copied) to score the k returned
        when ScaNN re-orders from its int8 copy."""
        super().__init__(keys.shape[0], keys.shape[1], build_params, search_params)
        self.searcher = searcher
        int8_reorder = build_params["reorder_bits"] == 8
        self.keys = np.ascontiguousarray(keys, dtype=np.float32) if int8_reorder else None  # (n, D)

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        num_leaves = 2 ** round(math.log2(1.5 * math.sqrt(num_keys)))
        return {
            "num_leaves": int(min(max(num_leaves, 4), num_keys)),
            "dims_per_block": 2,
            "anisotropic_threshold": 0.2,
            "reorder_factor": 4,
            "soar_lambda": None,
            "reorder_bits": 8,
        }

    @classmethod
    def build(cls, keys: np.ndarray, **build_params: Any) -> ScannIndex:
        params = {**cls.default_build_params(*keys.shape), **build_params}
        if params["reorder_bits"] not in (8, 32):
            raise BackendError(f"reorder_bits must be 8 or 32, got {params['reorder_bits']}")
        searcher = (
            _scann()
            .builder(keys, 10, "dot_product")
            .tree(
                num_leaves=params["num_leaves"],
                num_leaves_to_search=params["num_leaves"],
                training_sample_size=keys.shape[0],
                soar_lambda=params["soar_lambda"],
            )
            .score_ah(params["dims_per_block"], anisotropic_quantization_threshold=params["anisotropic_threshold"])
            .reorder(keys.shape[0], quantize=params["reorder_bits"] == 8)  # True: int8
            .build()
        )
        return cls(searcher, keys, params, {})

    def effort_range(self, k: int) -> tuple[int, int]:
        return (1, self.build_params["num_leaves"])

    @property
    def reorder_bits(self) -> int:
        return 32 if self.keys is None else 8

    def key_table(self) -> torch.Tensor | None:
        return None if self.keys is None else torch.from_numpy(self.keys)

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        leaves = self.resolve_effort(k, search_params)
        reorder = min(self.num_keys, self.build_params["reorder_factor"] * k)
        ids, scores = self.searcher.search_batched(
            queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder, leaves_to_search=leaves
        )
        ids = ids.astype(np.int64)
        missing = np.isnan(scores)  # ScaNN fills the slots it found no key for with id 0, score NaN
        ids[missing], scores[missing] = -1, -np.inf
        if ids.shape[1] < k:  # fewer keys in the whole index than k
            pad = k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        n_queries = queries.shape[0]
        exact_bytes = 0
        if self.keys is not None:  # int8 re-order: the k found, scored exactly from the model's keys
            scores = self._exact_scores(queries, ids)
            exact_bytes = n_queries * k * self.dim * BYTES_PER_FLOAT
        # Leaves are balanced by k-means only on average: count the expected keys per leaf.
        copies = 1 if self.build_params.get("soar_lambda") is None else 2  # SOAR stores every key twice
        scanned = n_queries * self.num_keys * copies * leaves / self.build_params["num_leaves"]
        code_bytes = scanned * math.ceil(self.dim / self.build_params["dims_per_block"]) / 2
        centroid_bytes = n_queries * self.build_params["num_leaves"] * self.dim * BYTES_PER_FLOAT
        rerank_bytes = n_queries * reorder * self.dim * self.reorder_bits // 8
        return SearchResult(
            scores.astype(np.float32), ids, int(scanned), int(code_bytes + centroid_bytes + rerank_bytes + exact_bytes)
        )

    def _exact_scores(self, queries: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """queries (N, D), ids (N, k) with -1 for none -> (N, k) exact scores, -inf for none.

        faiss scores the rows in place and skips ids of -1. Called directly, not through
        linalg.rows_dot: its torch round trip and the masking of -1 took 25 µs at batch 1
        (1536 x 385, k = 128), this 5. The rows stay in ScaNN's int8 order: nothing downstream
        needs them sorted, and at batch 1 the sort cost 10 µs."""
        scores = np.full(ids.shape, -np.inf, dtype=np.float32)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(
            faiss.swig_ptr(scores),
            faiss.swig_ptr(queries),
            faiss.swig_ptr(self.keys),
            faiss.swig_ptr(ids),
            self.dim,
            *ids.shape,
        )
        return scores

    def save(self, folder: Path, stem: str) -> list[str]:
        target = folder / stem
        target.mkdir()
        # relative asset paths, so the store can be renamed into place after writing
        self.searcher.serialize(str(target), relative_path=True)
        return sorted(str(p.relative_to(folder)) for p in target.iterdir())

    @classmethod
    def load(cls, folder, stem, keys, build_params, search_params) -> ScannIndex:
        ops = _scann()
        target = Path(folder) / stem
        # Build the searcher from its assets directly: scann's load_searcher would
        # unpickle a docids file if one were present.
        native = ops.scann_pybind.ScannNumpy(str(target), (target / ASSETS).read_text())
        return cls(ops.ScannSearcher(native), keys, build_params, search_params)
