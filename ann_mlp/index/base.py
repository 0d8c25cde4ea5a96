"""The MIPS index interface every backend implements.

Backends see only augmented vectors: keys [k_i; b_i] and queries [x; 1], both
(·, D) float32 with D = d_model + 1, never normalised (key norms matter for
inner products). Build parameters are fixed at build time; the search effort is
a query-time parameter, so one built index can be swept or tuned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from ann_mlp.quantized import QuantizedMatrix

BYTES_PER_FLOAT = 4


@dataclass(frozen=True)
class SearchResult:
    scores: np.ndarray  # (N, k) float32; exact inner products iff the index has exact_scores
    ids: np.ndarray  # (N, k) int64; -1 where fewer than k keys were found (score -inf or -FLT_MAX)
    keys_scored: int  # keys whose score was computed, at any precision, summed over the N queries
    bytes_read: int  # index bytes read to choose the candidates, summed over the N queries


class MipsIndex(ABC):
    """Top-k maximum inner product search over the rows of one key matrix."""

    name: ClassVar[str]  # registry key, as typed on the command line
    effort_param: ClassVar[str]  # the query-time knob that trades speed for recall
    # True when returned scores are full-precision inner products. Otherwise they are the index's
    # approximation, which the model's activations then see: re-scoring them would read the keys
    # the index was built not to read.
    exact_scores: bool
    needs_queries: ClassVar[bool] = False  # built from calibration queries as well as keys

    def __init__(self, num_keys: int, dim: int, build_params: dict[str, Any], search_params: dict[str, Any]) -> None:
        self.num_keys = num_keys
        self.dim = dim
        self.build_params = dict(build_params)
        self.search_params = dict(search_params)

    # -- construction -------------------------------------------------------
    @classmethod
    def over_defaults(cls, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        """The build parameters a user gave over a build's defaults (config.DEFAULT_BUILD_PARAMS)."""
        return {**defaults, **given}

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        """Build parameters as a pure function of the data's size."""
        return {}

    @classmethod
    @abstractmethod
    def build(cls, keys: np.ndarray, **build_params: Any) -> MipsIndex:
        """keys: (num_keys, D) float32, augmented with the bias column.

        Backends with `needs_queries` also take `queries` (N, D), real calibration
        queries, `k`, the number of keys the model will retrieve, and
        `target_recall`, the recall the build will tune the effort for (or None).
        """

    # -- query --------------------------------------------------------------
    @abstractmethod
    def effort_range(self, k: int) -> tuple[int, int]:
        """Smallest and largest meaningful values of `effort_param` for top-k."""

    @abstractmethod
    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        """queries: (N, D) float32. Unset search params fall back to self.search_params."""

    def resolve_effort(self, k: int, overrides: dict[str, Any]) -> int:
        unknown = set(overrides) - {self.effort_param}
        if unknown:
            from ann_mlp.errors import BackendError

            raise BackendError(
                f"{self.name} has no search parameter {', '.join(sorted(unknown))} (it has {self.effort_param})"
            )
        effort = overrides.get(self.effort_param)
        if effort is None:
            effort = self.search_params.get(self.effort_param, self.effort_range(k)[1])
        lo, hi = self.effort_range(k)
        return int(min(max(int(effort), lo), hi))

    # -- persistence ----------------------------------------------------------
    @abstractmethod
    def save(self, folder: Path, stem: str) -> list[str]:
        """Write the index under folder; return the file names written (relative)."""

    @classmethod
    @abstractmethod
    def load(
        cls, folder: Path, stem: str, keys: np.ndarray, build_params: dict[str, Any], search_params: dict[str, Any]
    ) -> MipsIndex:
        """Read what save() wrote. Never unpickles.

        keys: (num_keys, D) float32, the checkpoint's augmented keys the index was
        built from (the store verified the weights). Backends that re-score from
        them keep this array itself, not a copy.
        """

    def key_table(self) -> torch.Tensor | QuantizedMatrix | None:
        """The augmented keys as this index holds them in memory: (num_keys, >= dim), float32 or
        the model's dtype (hold_keys_like), rows in table_order(), columns past `dim` zero padding;
        a GGUF model's gate blocks themselves (no bias column: (num_keys, dim - 1)); None when it
        holds no such table.

        ApproxModel points the model's key parameters into this table when it is in the
        model's dtype, so a backend holding the keys anyway does not cost a second copy of them.
        """
        return None

    def hold_keys_like(self, model_keys: torch.Tensor | QuantizedMatrix) -> None:
        """Hold the key rows this index re-scores from as the model holds its keys (d_ff, d_model),
        where the backend can: in a bfloat16 model's dtype, so the index re-scores the very rows
        the model holds (shared by ApproxModel.open), not a float32 copy of them twice their size;
        a GGUF model's quantized blocks themselves. faiss and ScaNN keep float32 keys inside their
        own structures."""
        return None

    def table_order(self) -> np.ndarray | None:
        """(num_keys,) int64, the key in each row of key_table(); None when that is key order.

        An IVF holds each list's keys together. ApproxModel.open then puts the model's neurons
        in this order too, which leaves the MLP's output unchanged.
        """
        return None

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in {**self.build_params, **self.search_params}.items())
        return f"{type(self).__name__}({params})"

    @property
    def full_scan_bytes(self) -> int:
        """Bytes of an exhaustive full-precision scan, per query: the cost baseline."""
        return self.num_keys * self.dim * BYTES_PER_FLOAT


class KeyRowsIndex(MipsIndex):
    """A backend that scores its candidates exactly from the key rows themselves.

    It does not save the keys: they are the checkpoint's, and at load time it keeps
    the array it is given, which ApproxModel makes the model's own parameters
    point into, so the keys are held once in memory. What it learned beside the
    keys (`parts`, constructor arguments of the same names) is saved as .npy files.
    """

    exact_scores = True
    parts: ClassVar[tuple[str, ...]] = ()
    # Whether searches read the keys only a selected row at a time (rows_dot, best_candidates),
    # which rows of GGUF blocks serve; a backend scoring every key at once holds float keys.
    scores_rows_only: ClassVar[bool] = False

    def __init__(self, keys: np.ndarray, build_params: dict[str, Any], search_params: dict[str, Any]) -> None:
        super().__init__(keys.shape[0], keys.shape[1], build_params, search_params)
        # (n, D), not copied if float32 (hold_keys_like: as the model holds them); None when no search
        # reads them (the index's codes suffice).
        self.keys = (
            torch.from_numpy(np.ascontiguousarray(keys, dtype=np.float32)) if self.reads_keys(build_params) else None
        )

    @classmethod
    def reads_keys(cls, build_params: dict[str, Any]) -> bool:
        """Whether searches with these build parameters read the float32 key rows. An index that
        does not holds no reference to them: a bfloat16 model then keeps no float32 copy of its keys."""
        return True

    def key_table(self) -> torch.Tensor | QuantizedMatrix | None:
        return self.keys

    def hold_keys_like(self, model_keys: torch.Tensor | QuantizedMatrix) -> None:
        if self.keys is None:
            return
        if not isinstance(model_keys, QuantizedMatrix):
            self.keys = self.keys.to(model_keys.dtype)
        elif self.scores_rows_only and not self.keys[:, -1].any():  # a key bias would need a column of its own
            self.keys = model_keys

    def effort_range(self, k: int) -> tuple[int, int]:
        """By default the effort is how many candidates are re-scored exactly: from k to every key."""
        return (min(k, self.num_keys), self.num_keys)

    @classmethod
    def parts_for(cls, build_params: dict[str, Any]) -> tuple[str, ...]:
        """The learned arrays an index built with these parameters holds: by default all of `parts`."""
        return cls.parts

    def arrays(self) -> dict[str, np.ndarray]:
        """The learned arrays, one per name in parts_for(build_params)."""
        return {}

    def save(self, folder: Path, stem: str) -> list[str]:
        names = []
        for part, array in self.arrays().items():
            names.append(f"{stem}.{part}.npy")
            np.save(Path(folder) / names[-1], array, allow_pickle=False)
        return names

    @classmethod
    def load_arrays(cls, folder: Path, stem: str, build_params: dict[str, Any]) -> dict[str, np.ndarray]:
        return {
            part: np.load(Path(folder) / f"{stem}.{part}.npy", allow_pickle=False)
            for part in cls.parts_for(build_params)
        }

    @classmethod
    def load(cls, folder, stem, keys, build_params, search_params) -> KeyRowsIndex:
        return cls(
            keys, **cls.load_arrays(folder, stem, build_params), build_params=build_params, search_params=search_params
        )
