"""Low-rank pre-scoring: every key scored cheaply in a small learned subspace, the best re-scored exactly.

Keys are factored as K ≈ A B, fit to the queries the model sends (low_rank_fit), A held as 8- or
4-bit codes in a faiss flat scalar-quantizer index (the stored form; searches decode its memory in
place). A search projects the query (q Bᵀ, r numbers), scores every key from its codes, and
re-scores the best candidates from their full keys; what it reads is priced by
low_rank_cost.bytes_per_query.

Each stage is one field of LowRankParams:
- The projection: B's rows as 8-bit codes in a scalar-quantizer index of their own, so q Bᵀ reads
  r·D bytes and ranks the neurons as float32 B does (a float32 B would read four times as much).
- `rerank`, the query-time effort: how many of the best candidates by approximate score are
  re-scored. The sets are nested, so recall grows with it; rerank = num_keys is exact.
- `refine_rank` r2 > r: a middle stage re-scores the best `refine_factor`·rerank first-pass
  candidates with the fit's next r2 − r columns (the fit is nested, so that is the rank-r2 fit).
  It saves bytes but gathers columns per candidate, so it is off by default.
- `rerank_bits=8`: candidates re-ranked from 8-bit codes of the full keys (scores within about 1 %
  of exact), only the k kept scored from the full keys, none with `kept_bits=8` as well (the
  activations then see the approximate scores: `exact_scores` is false). At 32, the full keys as
  the model holds them: float32, or a bfloat16/float16 model's own rows (`hold_keys_like`), which
  then cost no memory beside the model's.
- `margin_rank` t > 0: how many are re-ranked adapts to each query. Every key whose approximate
  score is within `margin` (the effort, in hundredths of σ_q) of the query's k-th best is a
  candidate; σ_q is the typical error of that query's approximate scores: σ_q² = ||E q||², E (t, D)
  the residual K − A B's leading directions, plus with `margin_counts_rounding` the codes' rounding
  error (Σ_j (q·B_j)² step_j² / 12 over the rank-r columns). A fixed `rerank` tuned on calibration
  text re-ranks too few candidates for queries the fit serves badly, which is what queries from
  text of another kind are, and too many for those it serves well.
- `code_bits=4`: the first pass reads half a byte per key and rank; σ_q counts the coarser
  rounding, so a tuned margin keeps its recall on other text.
- `rank="auto"`: among ranks from D/32 to D/2, the one whose bytes per query are fewest at the
  target recall on the calibration queries (a layer's best rank depends on how many directions
  its queries use).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ann_mlp.errors import BackendError
from ann_mlp.index.base import BYTES_PER_FLOAT, KeyRowsIndex, SearchResult
from ann_mlp.index.low_rank_cost import (
    LowRankParams,
    bytes_per_query,
    refined_candidates,
    rerank_bytes,
    simd_padded,
)
from ann_mlp.index.low_rank_fit import (
    candidate_ranks,
    cheapest_ranks,
    rank_options,
    residual_error_basis,
    score_preserving_factors,
)
from ann_mlp.linalg import QUANTIZER_TYPES, RowCodes, best_candidates, best_unordered, rows_dot

MAX_MARGIN = 2000  # hundredths of σ_q: 20 σ_q re-ranks nearly every key
# Queries searched together at most: the first pass holds every key's score for each of them.
SEARCH_CHUNK = 256


class LowRankIndex(KeyRowsIndex):
    name = "lowrank"
    scores_rows_only = True
    needs_queries = True
    # key codes with rerank_bits = 8, the refinement stage's codes with refine_rank > 0, the error
    # basis with margin_rank > 0 (as 8-bit codes with error_basis_bits = 8)
    parts = (
        "key_codes",
        "key_ranges",
        "refine_codes",
        "refine_ranges",
        "error_basis",
        "error_basis_codes",
        "error_basis_ranges",
    )

    def __init__(
        self,
        keys: np.ndarray,
        codes: faiss.Index,
        projector: faiss.Index,
        build_params: dict[str, Any],
        search_params: dict[str, Any],
        key_codes: np.ndarray | None = None,
        key_ranges: np.ndarray | None = None,
        refine_codes: np.ndarray | None = None,
        refine_ranges: np.ndarray | None = None,
        error_basis: np.ndarray | None = None,
        error_basis_codes: np.ndarray | None = None,
        error_basis_ranges: np.ndarray | None = None,
    ) -> None:
        super().__init__(keys, build_params, search_params)
        self.params = LowRankParams.from_build_params(build_params)  # resolved: integer ranks
        self.codes = codes  # n vectors of r dims: A's rows, 8- or 4-bit
        self.projector = projector  # B's r2 rows, 8-bit, zero-padded: q Bᵀ is a search for all of them
        # rerank_bits = 8: the candidates are ranked by 8-bit codes of their keys.
        self.key_codes = None if key_codes is None else RowCodes(key_codes, key_ranges)
        # refine_rank > 0: columns r .. r2 of A, 8-bit, for the refinement stage.
        self.refine_codes = None if refine_codes is None else RowCodes(refine_codes, refine_ranges)
        # margin_rank > 0: E (t, D), as float32 or as 8-bit codes.
        self.error_basis = None if error_basis is None else torch.from_numpy(error_basis)
        self.error_basis_codes = None if error_basis_codes is None else RowCodes(error_basis_codes, error_basis_ranges)
        # code_table: the codes index's own memory read as RowCodes. The first pass decodes every key's
        # approximate score from it in torch and partitions: faiss' scan keeps a heap of candidates,
        # and at hundreds of candidates per query the heap cost more than the scan.
        view = faiss.rev_swig_ptr(codes.codes.data(), codes.ntotal * codes.code_size)
        self.code_table = RowCodes(
            view.reshape(codes.ntotal, codes.code_size),
            faiss.vector_to_array(codes.sq.trained).reshape(2, codes.d),
            self.params.code_bits,
        )
        # (r,) each code column's rounding variance, when σ_q counts it
        self.rounding_variance = (
            self.code_table.noise_variance if self.margin_rank and self.params.margin_counts_rounding else None
        )

    @property
    def effort_param(self) -> str:
        """`margin` (hundredths of σ_q) with an error basis, else `rerank`: candidates re-ranked
        per query (exactly, or from 8-bit keys)."""
        return "margin" if self.margin_rank else "rerank"

    def effort_range(self, k: int) -> tuple[int, int]:
        return (0, MAX_MARGIN) if self.margin_rank else super().effort_range(k)

    @property
    def margin_rank(self) -> int:
        return self.params.margin_rank

    @property
    def exact_scores(self) -> bool:
        return self.params.kept_bits == 32

    @classmethod
    def parts_for(cls, build_params: dict[str, Any]) -> tuple[str, ...]:
        params = LowRankParams.from_build_params(build_params)
        key_codes = ("key_codes", "key_ranges") if params.rerank_bits == 8 else ()
        refine = ("refine_codes", "refine_ranges") if params.refine_rank else ()
        error_basis = ()
        if params.margin_rank:
            error_basis = (
                ("error_basis",) if params.error_basis_bits == 32 else ("error_basis_codes", "error_basis_ranges")
            )
        return key_codes + refine + error_basis

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        return LowRankParams().to_build_params()

    @classmethod
    def over_defaults(cls, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
        # A refinement stage and a per-query margin exclude each other: a refine_rank the user
        # gives replaces the default margin rather than conflicting with it.
        if "refine_rank" in given:
            defaults = {name: value for name, value in defaults.items() if name != "margin_rank"}
        return super().over_defaults(defaults, given)

    @classmethod
    def reads_keys(cls, build_params: dict[str, Any]) -> bool:
        params = LowRankParams.from_build_params(build_params)
        return params.rerank_bits == 32 or params.kept_bits == 32

    @classmethod
    def build(
        cls,
        keys: np.ndarray,
        queries: np.ndarray | None = None,
        k: int | None = None,
        target_recall: float | None = None,
        **build_params: Any,
    ) -> LowRankIndex:
        if queries is None or len(queries) == 0 or k is None:
            raise BackendError("the lowrank backend is built from calibration queries and k")
        num_keys, dim = keys.shape
        params = LowRankParams.from_build_params(build_params)
        params.check(dim)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        options = rank_options(params, dim)  # (rank, refine_rank) pairs
        if not options:
            considered = candidate_ranks(dim) if params.rank == "auto" else [params.rank]
            raise BackendError(
                f"refine_rank {params.refine_rank} must exceed a first-pass rank (considered: {considered})"
            )
        # One fit at the largest rank considered: its leading r columns are the rank-r fit.
        a, b = score_preserving_factors(keys, queries, max(max(option) for option in options))
        rank, refine_rank = (
            options[0]
            if len(options) == 1
            else cheapest_ranks(keys, a, b, queries, k, target_recall or 0.95, params, options)
        )
        params = replace(params, rank=rank, refine_rank=refine_rank)
        quantized = {}
        if refine_rank:
            refined = RowCodes.encode(a[:, rank:refine_rank])
            quantized = {"refine_codes": refined.codes.numpy(), "refine_ranges": refined.ranges}
        rows = max(rank, refine_rank)  # of B: the projection computes the refinement's columns too
        a, b = np.ascontiguousarray(a[:, :rank]), np.ascontiguousarray(b[:rows])
        codes = faiss.IndexScalarQuantizer(rank, QUANTIZER_TYPES[params.code_bits], faiss.METRIC_INNER_PRODUCT)
        codes.train(a)
        codes.add(a)
        padded = np.zeros((rows, simd_padded(dim)), dtype=np.float32)  # (r2, D'): B, then zero columns
        padded[:, :dim] = b
        projector = faiss.IndexScalarQuantizer(
            padded.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
        projector.train(padded)
        projector.add(padded)
        if params.rerank_bits == 8:
            codes_of_keys = RowCodes.encode(keys)
            quantized.update(key_codes=codes_of_keys.codes.numpy(), key_ranges=codes_of_keys.ranges)
        if params.margin_rank:
            basis = residual_error_basis(keys, a, b, params.margin_rank)  # (t, D)
            if params.error_basis_bits == 8:
                coded = RowCodes.encode(basis)
                quantized.update(error_basis_codes=coded.codes.numpy(), error_basis_ranges=coded.ranges)
            else:
                quantized["error_basis"] = basis
        return cls(keys, codes, projector, params.to_build_params(), {}, **quantized)

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        if len(queries) > SEARCH_CHUNK:  # the first pass's (N, n) scores stay bounded
            parts = [
                self.search(queries[i : i + SEARCH_CHUNK], k, **search_params)
                for i in range(0, len(queries), SEARCH_CHUNK)
            ]
            return SearchResult(
                np.concatenate([part.scores for part in parts]),
                np.concatenate([part.ids for part in parts]),
                keys_scored=sum(part.keys_scored for part in parts),
                bytes_read=sum(part.bytes_read for part in parts),
            )
        effort = self.resolve_effort(k, search_params)
        rerank = 0 if self.margin_rank else effort
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (N, D)
        q_t = torch.from_numpy(q)  # the same memory
        valid, within_margin = None, 0  # (N, c) bool: the candidates within the margin; how many in all
        projected = torch.from_numpy(self._project(q))  # (N, r2)
        first = projected[:, : self.codes.d]  # (N, r)
        scores = self.code_table.dot_all(first)  # (N, n): every key's approximate score
        if self.margin_rank:
            candidates, valid, within_margin = self._within_margin(scores, first, q_t, k, effort / 100)
        elif self.refine_codes is None:
            candidates = best_unordered(scores, rerank)  # (N, rerank)
        else:
            candidates = self._refined_candidates(scores, projected, rerank)
        if self.key_codes is None:
            values, ids = best_candidates(self.keys, candidates, q_t, k, valid)
        else:
            values, ids = self._best_by_key_codes(candidates, q_t, k, valid)
        key_bytes = BYTES_PER_FLOAT if self.keys is None else self.keys.element_size()
        per_query = bytes_per_query(self.params, self.num_keys, self.dim, rerank, k, key_bytes)
        return SearchResult(
            values.numpy(),
            ids.numpy(),
            keys_scored=len(q) * self.num_keys,
            bytes_read=round(len(q) * per_query + within_margin * self.dim * rerank_bytes(self.params, key_bytes)),
        )

    def _project(self, q: np.ndarray) -> np.ndarray:
        """q Bᵀ from the 8-bit projection: q (N, D) -> (N, r2)."""
        n_queries, num_rows = len(q), self.projector.ntotal
        padded = np.zeros((n_queries, self.projector.d), dtype=np.float32)  # (N, D'): q, then zeros
        padded[:, : self.dim] = q
        row_scores = np.empty((n_queries, num_rows), dtype=np.float32)  # q·B_j for every row j, best first
        rows = np.empty((n_queries, num_rows), dtype=np.int64)
        # The C entry point: the wrapper's checks and copies cost as much as this tiny search.
        self.projector.search_c(
            n_queries, faiss.swig_ptr(padded), num_rows, faiss.swig_ptr(row_scores), faiss.swig_ptr(rows)
        )
        projected = np.empty_like(row_scores)
        projected[np.arange(n_queries)[:, None], rows] = row_scores  # q Bᵀ in row order
        return projected

    def _score_error(self, q: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """σ_q, each query's expected approximate score error: the factorisation's residual as far
        as the error basis carries it, and the codes' rounding where the store counts it (even 8-bit
        rounding widens σ_q by 0.5-10 % on minilm-sparse's layers). q (N, D), first (N, r) = q Bᵀ -> (N,).
        """
        residual = (
            q @ self.error_basis.T if self.error_basis_codes is None else self.error_basis_codes.dot_all(q)
        )  # (N, t)
        variance = residual.square().sum(1)  # (N,)
        if self.rounding_variance is not None:
            variance = variance + first.square() @ self.rounding_variance
        return variance.sqrt()

    def _within_margin(
        self, scores: torch.Tensor, first: torch.Tensor, q: torch.Tensor, k: int, margin: float
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Each query's keys whose approximate score is within margin·σ_q of its k-th best:
        scores (N, n) approximate, first (N, r), q (N, D) -> (candidates (N, c), valid (N, c) bool
        or None when every slot is, candidates in all). c is the widest query's count; a narrower
        row's slots past its own candidates hold keys below its cut, marked not valid.
        """
        n = scores.shape[1]
        kth_best = torch.from_numpy(np.partition(scores.numpy(), n - k, axis=1)[:, n - k])  # (N,)
        cut = kth_best - margin * self._score_error(q, first)  # (N,)
        counts = (scores >= cut[:, None]).sum(1)  # (N,) >= k
        candidates = best_unordered(scores, int(counts.max()))  # (N, c)
        widest, total = candidates.shape[1], int(counts.sum())
        valid = None if total == widest * len(q) else scores.gather(1, candidates) >= cut[:, None]
        return candidates, valid, total

    def _refined_candidates(self, scores: torch.Tensor, projected: torch.Tensor, rerank: int) -> torch.Tensor:
        """The best `rerank` by rank-r2 score among the best refine_factor·rerank by rank-r score:
        scores (N, n) rank-r, projected (N, r2) -> (N, rerank)."""
        num_first = refined_candidates(self.num_keys, rerank, self.params.refine_factor)
        first = best_unordered(scores, num_first)  # (N, R1)
        further = self.refine_codes.dot(first, projected[:, self.codes.d :])  # (N, R1): columns r..r2
        refined = scores.gather(1, first) + further  # (N, R1): rank-r2 scores
        return first.gather(1, refined.topk(rerank, dim=1).indices)  # (N, rerank)

    def _best_by_key_codes(
        self, candidates: torch.Tensor, q: torch.Tensor, k: int, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best candidates by their 8-bit keys, scored exactly unless kept_bits = 8:
        candidates (N, R), q (N, D), valid (N, R) bool or None (all) -> (scores, ids) (N, k)."""
        coarse = self.key_codes.dot(candidates, q)  # (N, R)
        if valid is not None:
            coarse = coarse.masked_fill(~valid, -torch.inf)
        best, order = coarse.topk(min(k, candidates.shape[1]), dim=1)  # (N, k)
        kept = candidates.gather(1, order)  # (N, k)
        return (best, kept) if self.params.kept_bits == 8 else (rows_dot(self.keys, kept, q), kept)

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {}
        for name, table in (
            ("key", self.key_codes),
            ("refine", self.refine_codes),
            ("error_basis", self.error_basis_codes),
        ):
            if table is not None:
                arrays.update({f"{name}_codes": table.codes.numpy(), f"{name}_ranges": table.ranges})
        if self.error_basis is not None:
            arrays["error_basis"] = self.error_basis.numpy()
        return arrays

    def save(self, folder: Path, stem: str) -> list[str]:
        indexes = {"codes": self.codes, "projection": self.projector}
        names = []
        for part, index in indexes.items():
            names.append(f"{stem}.{part}.faiss")
            faiss.write_index(index, str(Path(folder) / names[-1]))
        return [*super().save(folder, stem), *names]

    @classmethod
    def load(cls, folder, stem, keys, build_params, search_params) -> LowRankIndex:
        codes = faiss.read_index(str(Path(folder) / f"{stem}.codes.faiss"))
        if codes.ntotal != len(keys):
            raise BackendError(f"{stem}: {codes.ntotal} codes for {len(keys)} keys")
        params = LowRankParams.from_build_params(build_params)
        parts: dict[str, Any] = cls.load_arrays(folder, stem, build_params)
        parts["projector"] = projector = faiss.read_index(str(Path(folder) / f"{stem}.projection.faiss"))
        if projector.ntotal != max(codes.d, params.refine_rank):
            raise BackendError(f"{stem}: a rank-{projector.ntotal} projection for rank-{codes.d} codes")
        return cls(keys, codes=codes, **parts, build_params=build_params, search_params=search_params)
