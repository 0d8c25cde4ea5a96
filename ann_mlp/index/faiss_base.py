"""What the faiss backends share: persistence with faiss' own serialiser (no pickle)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss

from ann_mlp.errors import BackendError
from ann_mlp.index.base import MipsIndex


class FaissIndex(MipsIndex):
    def __init__(self, index: faiss.Index, build_params: dict[str, Any],
                 search_params: dict[str, Any]) -> None:
        super().__init__(index.ntotal, index.d, build_params, search_params)
        self.index = index

    def save(self, folder: Path, stem: str) -> list[str]:
        name = f"{stem}.faiss"
        faiss.write_index(self.index, str(folder / name))
        return [name]

    @classmethod
    def load(cls, folder, stem, keys, build_params, search_params):
        index = faiss.read_index(str(folder / f"{stem}.faiss"))
        if index.ntotal != len(keys):
            raise BackendError(f"{stem}: the index holds {index.ntotal} keys, the layer has {len(keys)}")
        return cls(index, build_params, search_params)
