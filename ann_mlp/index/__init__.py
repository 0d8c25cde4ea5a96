"""Registry of MIPS backends: `make_index(name, keys)` and `load_index(...)`."""

from __future__ import annotations

from typing import Any

import numpy as np

from ann_mlp.errors import BackendError
from ann_mlp.index.base import KeyRowsIndex, MipsIndex, SearchResult
from ann_mlp.index.exact import ExactIndex
from ann_mlp.index.faiss_hnsw import HnswIndex
from ann_mlp.index.faiss_ivf import IvfIndex
from ann_mlp.index.faiss_pq import PqRefineIndex
from ann_mlp.index.low_rank import LowRankIndex
from ann_mlp.index.predictor import NeuronPredictorIndex
from ann_mlp.index.query_cells import QueryCellsIndex
from ann_mlp.index.scann_index import ScannIndex
from ann_mlp.index.teal import InputSparsityIndex

__all__ = ["BACKENDS", "KeyRowsIndex", "MipsIndex", "SearchResult", "backend_class", "build_index"]

BACKENDS: dict[str, type[MipsIndex]] = {
    cls.name: cls
    for cls in (
        ExactIndex,
        IvfIndex,
        HnswIndex,
        PqRefineIndex,
        ScannIndex,
        QueryCellsIndex,
        LowRankIndex,
        NeuronPredictorIndex,
        InputSparsityIndex,
    )
}


def backend_class(name: str) -> type[MipsIndex]:
    try:
        return BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}") from None


def build_index(
    name: str,
    keys: np.ndarray,
    queries: np.ndarray | None = None,
    k: int | None = None,
    target_recall: float | None = None,
    **build_params: Any,
) -> MipsIndex:
    """Build backend `name`; calibration queries, k and the recall the build will tune
    for are passed to the backends that learn from queries."""
    cls = backend_class(name)
    if cls.needs_queries:
        build_params = {**build_params, "queries": queries, "k": k, "target_recall": target_recall}
    try:
        return cls.build(np.ascontiguousarray(keys, dtype=np.float32), **build_params)
    except (TypeError, KeyError, RuntimeError) as err:
        raise BackendError(f"cannot build {name} with {build_params}: {err}") from err
