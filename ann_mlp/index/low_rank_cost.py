"""The low-rank backend's build parameters and what one query costs it in bytes read.

Every choice the build makes is one field of `LowRankParams`; the store records them all, so a
loaded index is described by its manifest alone, and `bytes_per_query` prices any of them, both
when the build compares ranks and when a search reports what it read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from ann_mlp.errors import BackendError
from ann_mlp.index.base import BYTES_PER_FLOAT
from ann_mlp.linalg import round_up_16

# First-pass candidates per re-ranked one with a refinement stage: the best `refine_factor`·rerank
# by rank-r score are re-scored at rank r2 (minilm-sparse's layers were cheapest between 2.3 and 2.8).
DEFAULT_REFINE_FACTOR = 2.5


@dataclass(frozen=True)
class LowRankParams:
    """How a low-rank index is built; "auto" fields are resolved by the build and stored resolved."""

    rank: int | str = "auto"  # r, columns of the factorisation the first pass scores ("auto": cheapest)
    code_bits: int = 8  # first-pass codes of A: 8 or 4 bits per key and rank
    rerank_bits: int = 32  # candidates re-ranked from float32 keys (32) or 8-bit key codes (8)
    kept_bits: int = 32  # with rerank_bits 8: the k kept re-scored from float32 keys (32) or not (8)
    refine_rank: int | str = 0  # r2 > r: a refinement stage at rank r2 (0: none; "auto": 0, 2r or 3r)
    refine_factor: float = DEFAULT_REFINE_FACTOR
    margin_rank: int = 0  # t > 0: candidates within a per-query margin, σ_q from t error directions
    error_basis_bits: int = 8  # the error basis E as float32 (32) or 8-bit codes (8)
    margin_counts_rounding: bool = True  # σ_q counts the codes' rounding as well as the residual

    @classmethod
    def from_build_params(cls, build_params: dict[str, Any]) -> LowRankParams:
        unknown = set(build_params) - {f.name for f in fields(cls)}
        if unknown:
            raise BackendError(f"unknown lowrank build parameters: {', '.join(sorted(unknown))}")
        return cls(**build_params)

    def to_build_params(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, dim: int) -> None:
        """BackendError naming the first parameter that is out of range or conflicts with another."""
        for name in ("rerank_bits", "kept_bits", "error_basis_bits"):
            if getattr(self, name) not in (8, 32):
                raise BackendError(f"{name} must be 8 or 32, got {getattr(self, name)!r}")
        if self.code_bits not in (4, 8):
            raise BackendError(f"code_bits must be 4 or 8, got {self.code_bits!r}")
        if self.kept_bits == 8 and self.rerank_bits != 8:
            raise BackendError("kept_bits=8 scores the kept keys from the 8-bit key codes: it needs rerank_bits=8")
        if not isinstance(self.refine_factor, (int, float)) or self.refine_factor < 1:
            raise BackendError(f"refine_factor must be a number >= 1, got {self.refine_factor!r}")
        if self.rank != "auto" and (not isinstance(self.rank, int) or not 1 <= self.rank <= dim):
            raise BackendError(f"rank must be 'auto' or an integer in [1, {dim}], got {self.rank!r}")
        refine = self.refine_rank
        if refine not in (0, "auto") and (
            not isinstance(refine, int) or not 1 < refine <= dim or self.rank != "auto" and self.rank >= refine
        ):
            raise BackendError(f"refine_rank must be 0, 'auto' or an integer in (rank, {dim}], got {refine!r}")
        if not isinstance(self.margin_rank, int) or not 0 <= self.margin_rank <= dim:
            raise BackendError(f"margin_rank must be an integer in [0, {dim}], got {self.margin_rank!r}")
        if self.margin_rank and refine:
            raise BackendError("margin_rank and refine_rank exclude each other")
        if not isinstance(self.margin_counts_rounding, bool):
            raise BackendError(f"margin_counts_rounding must be true or false, got {self.margin_counts_rounding!r}")


def simd_padded(dim: int) -> int:
    """faiss' scalar-quantizer scan takes its SIMD path only for dimensions that are multiples of 16
    (D = d_model + 1 never is), so B's rows are padded with zero columns to the next one."""
    return round_up_16(dim)


def refined_candidates(num_keys: int, rerank: int, refine_factor: float) -> int:
    """How many candidates the refinement stage re-scores to keep `rerank` of them."""
    return min(num_keys, math.ceil(refine_factor * rerank))


def bytes_per_query(
    params: LowRankParams, num_keys: int, dim: int, rerank: int, k: int, key_bytes: int = BYTES_PER_FLOAT
) -> int:
    """Index bytes one query reads at resolved `params` (integer rank and refine_rank):

    the 8-bit projection (r·D' bytes, D' = D padded for SIMD; r2 rows with a
    refinement stage) + the codes (a byte, or half of one at 4 bits, per key and rank) + the refined
    candidates' r2 − r further code bytes + the `rerank` re-ranked full keys (a byte per element
    at rerank_bits = 8, else `key_bytes`: 4 for float32 keys, 2 for a 16-bit model's own) + for
    8-bit re-ranking the k kept keys re-scored at full precision unless kept_bits = 8 + the error
    basis (t·D floats, or bytes at 8 bits) with a margin. A margin search adds its candidates'
    keys, which only the search knows.
    """
    rank, refine_rank = params.rank, params.refine_rank
    kept = k * dim * key_bytes if params.rerank_bits == 8 and params.kept_bits == 32 else 0
    projection = max(rank, refine_rank) * simd_padded(dim)
    codes = num_keys * math.ceil(rank * params.code_bits / 8)
    refine = refined_candidates(num_keys, rerank, params.refine_factor) * (refine_rank - rank) if refine_rank else 0
    error_basis = params.margin_rank * dim * params.error_basis_bits // 8
    return projection + codes + refine + rerank * dim * rerank_bytes(params, key_bytes) + kept + error_basis


def rerank_bytes(params: LowRankParams, key_bytes: int = BYTES_PER_FLOAT) -> int:
    """Bytes read per element of a re-ranked key: its 8-bit code, or the key as held."""
    return 1 if params.rerank_bits == 8 else key_bytes
