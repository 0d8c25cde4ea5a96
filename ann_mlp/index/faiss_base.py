"""What the faiss backends share: persistence with faiss' own serialiser (no pickle), and the
full-precision keys some of them hold, lent to the model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ann_mlp.errors import BackendError
from ann_mlp.index.base import MipsIndex


class FaissIndex(MipsIndex):
    def __init__(self, index: faiss.Index, build_params: dict[str, Any], search_params: dict[str, Any]) -> None:
        super().__init__(index.ntotal, index.d, build_params, search_params)
        self.index = index

    def flat_storage(self) -> faiss.IndexFlat | None:
        """The flat index inside this one that holds every key at full precision, in key order."""
        return None

    def key_table(self) -> torch.Tensor | None:
        storage = self.flat_storage()
        if storage is None:
            return None
        view = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d)  # faiss' memory, not a copy
        return torch.from_numpy(np.asarray(_KeptAlive(view.reshape(storage.ntotal, storage.d), self.index)))

    def save(self, folder: Path, stem: str) -> list[str]:
        name = f"{stem}.faiss"
        faiss.write_index(self.index, str(folder / name))
        return [name]

    @classmethod
    def load(cls, folder, stem, keys, build_params, search_params):
        index = faiss.read_index(str(folder / f"{stem}.faiss"))
        if index.ntotal != len(keys):
            raise BackendError(f"{stem}: the index holds {index.ntotal} keys, the layer has {len(keys)}")
        loaded = cls(index, build_params, search_params)
        held, order = loaded.key_table(), loaded.table_order()
        # The model will run on these keys: they must be the checkpoint's, bit for bit.
        if held is not None and not np.array_equal(
            held[:, : keys.shape[1]].numpy(), keys if order is None else keys[order]
        ):
            raise BackendError(f"{stem}: the keys inside the index are not the checkpoint's")
        return loaded


class _KeptAlive:
    """An array view of memory the faiss index owns, holding a reference to the index: arrays
    and tensors made from it keep the index, and so the memory, alive."""

    def __init__(self, view: np.ndarray, owner: faiss.Index) -> None:
        self.__array_interface__ = view.__array_interface__
        self.owner = owner
