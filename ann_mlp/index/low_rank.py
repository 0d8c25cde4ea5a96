"""Low-rank pre-scoring: every key scored cheaply in a small learned subspace, the best re-scored exactly.

A rank-r factorisation K ≈ A B is fit to the queries the model actually sends:
it minimises E_q ||(K − A B) q||² over real calibration queries, i.e. the error
of the scores, not of the keys (truncated SVD of K C^½ with C = E[q qᵀ], then
B = Vᵣᵀ C^−½). Hidden states live in a few directions, so a small r ranks the
neurons almost as the exact scores do. A is held as 8-bit codes in a faiss flat
scalar-quantizer index (SIMD scan, releases the GIL).

Cost per query: the projection (r·D floats, or r·D bytes with
`projection_bits=8`, the default of new builds: B's rows in a scalar-quantizer
index of their own, which ranks the neurons as the float32 B does), d_ff·r bytes
of codes, and the `rerank` candidates' full keys. `rerank` is the query-time knob; the candidates
are the best `rerank` by approximate score, so the sets are nested and recall
grows with it; rerank = num_keys is an exhaustive exact search.

With `refine_rank` r2 > r (8-bit projection only; "auto" picks none, 2r or
3r with the rank; none by default), a refinement stage sits
between the two: the best `refine_factor`·rerank by rank-r score are re-scored
with the fit's next r2 − r columns (8-bit codes, r2 − r bytes per candidate;
the fit is nested, so rank r plus those columns is the rank-r2 fit) and the best
`rerank` of them go on to the re-rank. On minilm-sparse's held-out hidden states
(k = 96 of 1536) it cut the bytes for recall 0.96 by 5 %, and on relu-lm's
served settings by 14 %: a cheap first pass over every key, a sharper one over
the best few hundred. It costs time at these sizes (faiss keeps 2.5·rerank
candidates in its heap, the extra columns are gathered per candidate): one
query's search took 1.2-2.2x as long per layer (one layer 0.9x), hence off by default.

With `rerank_bits=8` the candidates are re-ranked from 8-bit codes of the full
keys (per-dimension scalar quantization, as ScaNN re-orders with int8: scores
within about 1 % of exact), and only the k kept are scored from the float32
keys: a quarter of the re-rank bytes plus k full keys. The codes are held
beside the keys (a quarter of their memory). With `kept_bits=8` as well, the k
kept keep their 8-bit scores and no float32 key is read at all: the activations
then see scores within about 1 % of exact (`exact_scores` is false).

With `margin_rank` t > 0 (8-bit projection, no refinement), how many are re-ranked
adapts to each query: every key whose approximate score is within `margin` of the
query's k-th best approximate score is a candidate, the margin counted in σ_q, the
typical error of that query's approximate scores (σ_q² = ||E q||², E (t, D) the
leading directions of the residual K − A B, scaled: the mean squared score error
over all keys, as far as t directions carry it), plus, where the store says so
(`margin_counts_rounding`, true in every new build), the rounding error of the codes (Σ_j (q·B_j)² step_j² / 12
over the rank-r columns, step_j one code's width). E is read
from 8-bit codes of its own in new builds (`error_basis_bits=8`). A fixed `rerank`, tuned on
calibration text, re-ranks too few candidates for queries the factorisation fits
badly, which is what queries from text of another kind are (they use directions
the calibration queries did not), and too many for those it fits well. The
effort is then `margin`, in hundredths of σ_q.

With `code_bits=4` the first pass reads half a byte per key and rank (faiss' QT_4bit). Its
rounding error is then comparable to the factorisation's, which is why σ_q counts it: a
margin tuned on calibration text then keeps its recall on other text, with no wider
margins than the rounding needs. On minilm-sparse (k = 96 of 1536, tuned on docstrings,
evaluated end to end on Python's reST docs) 4-bit codes at rank 112 tuned to 0.96 read
0.116 of the bytes at recall 0.958 (embedding cosine 0.992), where 8-bit codes at rank 96
tuned to 0.95 read 0.138 at 0.950 (0.991).

The best rank depends on the layer (how many directions its queries use): with
rank "auto" the build picks, among ranks from D/32 to D/2, the one whose
total bytes per query are smallest at the target recall on the calibration queries.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from ann_mlp.errors import BackendError
from ann_mlp.index.base import BYTES_PER_FLOAT, KeyRowsIndex, SearchResult
from ann_mlp.linalg import QUANTIZER_TYPES, RowCodes, best_candidates, round_up_16, rows_dot

MAX_MARGIN = 2000  # hundredths of σ_q: 20 σ_q re-ranks nearly every key
# Codes (keys × rank) up to which a margin search decodes every key's approximate score in torch
# rather than keep a growing heap in faiss' scan. One query, topk-lm layer 0 (4096 × 32): 383 µs
# vs 693 µs; 4096 × 64: 138 vs 106 µs; 16384 × 256: 2516 vs 449 µs.
DECODED_FIRST_PASS_MAX = 1 << 18


def score_preserving_factors(keys: np.ndarray, queries: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """keys (n, D), queries (N, D) -> A (n, r), B (r, D) minimising E_q ||(keys − A B) q||²."""
    q = torch.from_numpy(queries).double()
    second_moment = q.T @ q / len(q)  # (D, D)
    eigenvalues, eigenvectors = torch.linalg.eigh(second_moment)
    # Directions the queries (almost) never use carry no score, and B gets no component there
    # (C^−½ becomes the pseudo-inverse): inverting their tiny eigenvalues would fill B with large
    # entries that cancel on real queries, which amplifies a stray query component and which 8-bit
    # codes of B cannot represent.
    used = eigenvalues > float(eigenvalues.max()) * 1e-6  # std above 1/1000 of the largest
    root = eigenvalues.clamp_min(0).sqrt()  # (D,)
    inv_root = torch.where(used, 1 / root.clamp_min(torch.finfo(root.dtype).tiny), 0)  # (D,)
    sqrt_c = (eigenvectors * root) @ eigenvectors.T  # (D, D)
    inv_sqrt_c = (eigenvectors * inv_root) @ eigenvectors.T  # (D, D): pseudo-inverse of C^½
    u, s, vt = torch.linalg.svd(torch.from_numpy(keys).double() @ sqrt_c, full_matrices=False)
    a = u[:, :rank] * s[:rank]  # (n, r)
    b = vt[:rank] @ inv_sqrt_c  # (r, D)
    return a.float().numpy(), b.float().numpy()


QUERY_CHUNK = 512  # queries scored at once when tuning: their (chunk, n) score matrices stay small


def true_top_k(keys: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Each query's exact top k: keys (n, D), queries (N, D) -> ids (N, k)."""
    return torch.cat([(chunk @ keys.T).topk(k, dim=1).indices for chunk in queries.split(QUERY_CHUNK)])


def rerank_needed(keys: torch.Tensor, a: torch.Tensor, b: torch.Tensor, queries: torch.Tensor, k: int,
                  target_recall: float, true_top: torch.Tensor | None = None) -> int:
    """Candidates to re-score so that mean recall@k reaches the target when ranking by (q Bᵀ) Aᵀ.

    keys (n, D), a (n, r), b (r, D), queries (N, D), true_top (N, k) from true_top_k (computed
    when not given). Every query has k true neighbours, so mean recall at R candidates is the
    share of all true neighbours ranked below R by approximate score: R is a quantile of those ranks.
    """
    true_top = true_top_k(keys, queries, k) if true_top is None else true_top
    ranks = []
    for chunk, chunk_top in zip(queries.split(QUERY_CHUNK), true_top.split(QUERY_CHUNK)):  # (c, D), (c, k)
        order = ((chunk @ b.T) @ a.T).argsort(dim=1, descending=True)  # (c, n)
        rank_of = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
        ranks.append(rank_of.gather(1, chunk_top).flatten())
    all_ranks = torch.cat(ranks).float()
    return int(torch.quantile(all_ranks, min(target_recall, 1.0)).item()) + 1


def residual_error_basis(keys: np.ndarray, a: np.ndarray, b: np.ndarray, rank: int) -> np.ndarray:
    """E (t, D) with ||E q||² the mean over keys of (q · (k_i − a_i B))², as far as the residual's
    `rank` leading directions carry it: keys (n, D), a (n, r), b (r, D)."""
    residual = torch.from_numpy(keys).double() - torch.from_numpy(a).double() @ torch.from_numpy(b).double()  # (n, D)
    eigenvalues, eigenvectors = torch.linalg.eigh(residual.T @ residual / len(keys))  # ascending
    leading = eigenvectors[:, -rank:] * eigenvalues[-rank:].clamp_min(0).sqrt()  # (D, t)
    return leading.T.float().numpy()


def refined_candidates(num_keys: int, rerank: int, refine_factor: float) -> int:
    """How many candidates the refinement stage re-scores to keep `rerank` of them."""
    return min(num_keys, math.ceil(refine_factor * rerank))


def bytes_per_query(num_keys: int, dim: int, rank: int, rerank: int, k: int, rerank_bits: int = 32,
                    kept_bits: int = 32, projection_bits: int = 32, refine_rank: int = 0,
                    refine_factor: float = 0.0, margin_rank: int = 0, code_bits: int = 8,
                    error_basis_bits: int = 32) -> int:
    """Projection (r·D floats, or r·D' bytes at 8 bits, D' = D padded for SIMD; r2 rows with a
    refinement stage) + the codes (a byte, or half of one at 4 bits, per key and rank) + the
    refined candidates' r2 − r further code bytes + the re-ranked full keys at rerank_bits + for
    8-bit re-ranking the k kept keys re-scored in float32 unless kept_bits = 8 + the error basis
    (t·D floats, or bytes at 8 bits) with a margin."""
    kept = k * dim * BYTES_PER_FLOAT if rerank_bits == 8 and kept_bits == 32 else 0
    projection = max(rank, refine_rank) * (dim * BYTES_PER_FLOAT if projection_bits == 32 else simd_padded(dim))
    codes = num_keys * math.ceil(rank * code_bits / 8)
    refine = refined_candidates(num_keys, rerank, refine_factor) * (refine_rank - rank) if refine_rank else 0
    error_basis = margin_rank * dim * error_basis_bits // 8
    return projection + codes + refine + rerank * dim * rerank_bits // 8 + kept + error_basis


def refined_rerank_needed(keys: torch.Tensor, a: torch.Tensor, b: torch.Tensor, queries: torch.Tensor, k: int,
                          target_recall: float, rank: int, refine_rank: int, refine_factor: float,
                          true_top: torch.Tensor | None = None) -> int:
    """Candidates to re-score (`rerank`) so that mean recall@k reaches the target when the best
    refine_factor·rerank by rank-r score are re-ordered by rank-r2 score and the best rerank kept.

    keys (n, D), a (n, ≥ r2), b (≥ r2, D), queries (N, D), true_top (N, k) as for rerank_needed;
    bisection, as recall grows with rerank.
    """
    num_keys = len(keys)
    true_top = true_top_k(keys, queries, k) if true_top is None else true_top
    chunks = []  # per chunk of queries: true top-k (c, k), rank-r scores (c, n), rank-r2 scores (c, n)
    for chunk, chunk_top in zip(queries.split(QUERY_CHUNK), true_top.split(QUERY_CHUNK)):  # (c, D), (c, k)
        projected = chunk @ b[:refine_rank].T  # (c, r2)
        chunks.append((chunk_top, projected[:, :rank] @ a[:, :rank].T, projected @ a[:, :refine_rank].T))

    def recall(rerank: int) -> float:
        hits = 0.0
        for true_top, first_scores, refined_scores in chunks:
            first = first_scores.topk(refined_candidates(num_keys, rerank, refine_factor), dim=1).indices  # (c, R1)
            kept = first.gather(1, refined_scores.gather(1, first).topk(rerank, dim=1).indices)  # (c, rerank)
            found = torch.zeros_like(first_scores, dtype=torch.bool).scatter_(1, kept, True)  # (c, n)
            hits += found.gather(1, true_top).sum().item()
        return hits / (len(queries) * k)

    lo, hi = k, num_keys
    while lo < hi:
        mid = (lo + hi) // 2
        if recall(mid) >= target_recall:
            hi = mid
        else:
            lo = mid + 1
    return lo


def simd_padded(dim: int) -> int:
    """faiss' scalar-quantizer scan takes its SIMD path only for dimensions that are multiples of 16
    (D = d_model + 1 never is): padding B's rows with zero columns made q Bᵀ 5× faster (1025 dims)."""
    return round_up_16(dim)


def candidate_ranks(dim: int) -> list[int]:
    """D/32 ... D/2 in steps of about 1.4×, multiples of 8 (the codes' SIMD width), at least 8."""
    return sorted({min(dim, max(8, dim // divisor // 8 * 8)) for divisor in (32, 24, 16, 12, 8, 6, 4, 3, 2)})


DEFAULT_REFINE_FACTOR = 2.5  # first-pass candidates per re-ranked one (minilm-sparse: 2.3-2.8 was best)


class LowRankIndex(KeyRowsIndex):
    name = "lowrank"
    needs_queries = True
    # float32 projection with projection_bits = 32, key codes with rerank_bits = 8, the refinement
    # stage's codes with refine_rank > 0, the error basis with margin_rank > 0 (as 8-bit codes with
    # error_basis_bits = 8)
    parts = ("projection", "key_codes", "key_ranges", "refine_codes", "refine_ranges", "error_basis",
             "error_basis_codes", "error_basis_ranges")

    def __init__(self, keys: np.ndarray, codes: faiss.Index, projection: np.ndarray | faiss.Index,
                 build_params: dict[str, Any], search_params: dict[str, Any],
                 key_codes: np.ndarray | None = None, key_ranges: np.ndarray | None = None,
                 refine_codes: np.ndarray | None = None, refine_ranges: np.ndarray | None = None,
                 error_basis: np.ndarray | None = None, error_basis_codes: np.ndarray | None = None,
                 error_basis_ranges: np.ndarray | None = None) -> None:
        super().__init__(keys, build_params, search_params)
        self.codes = codes  # n vectors of r dims: A's rows, 8- or 4-bit
        if isinstance(projection, faiss.Index):  # B's r rows, 8-bit: q Bᵀ is a search for all r of them
            self.projector, self.projection = projection, None
        else:
            # The codes index projects the queries itself (q Bᵀ in faiss' own BLAS and threads): a numpy
            # projection between faiss calls made numpy's thread pool fight faiss' spinning one for the
            # two cores, 8 ms per search at 1024x4096 instead of 0.3 ms.
            self.projector, self.projection = None, np.ascontiguousarray(projection, dtype=np.float32)  # (r, D)
            rank, dim = self.projection.shape
            transform = faiss.LinearTransform(dim, rank, False)
            faiss.copy_array_to_vector(self.projection.ravel(), transform.A)
            transform.is_trained = True
            self.projected_codes = faiss.IndexPreTransform(transform, codes)
        # rerank_bits = 8: the candidates are ranked by 8-bit codes of their keys.
        self.key_codes = None if key_codes is None else RowCodes(key_codes, key_ranges)
        # refine_rank > 0: columns r .. r2 of A, 8-bit, for the refinement stage.
        self.refine_codes = None if refine_codes is None else RowCodes(refine_codes, refine_ranges)
        # margin_rank > 0: E (t, D), float32 or 8-bit codes; the codes index's own memory read as
        # RowCodes (its rounding error counts in σ_q, and small layers decode every key's approximate
        # score from it); for larger layers how many candidates the last search's widest margin held.
        self.error_basis = None if error_basis is None else torch.from_numpy(error_basis)
        self.error_basis_codes = None if error_basis_codes is None else RowCodes(error_basis_codes, error_basis_ranges)
        # rounding_variance: (r,) each code column's rounding variance, when σ_q counts it (stores
        # built without margin_counts_rounding tuned their margins to the residual alone).
        # first_pass: the codes index's own memory read as RowCodes, so that small layers score every
        # key from the decoded codes in torch rather than keep a heap of candidates in faiss' scan.
        self.first_pass, self.rounding_variance, self._margin_width = None, None, 0
        view = faiss.rev_swig_ptr(codes.codes.data(), codes.ntotal * codes.code_size)
        code_table = RowCodes(view.reshape(codes.ntotal, codes.code_size),
                              faiss.vector_to_array(codes.sq.trained).reshape(2, codes.d), self.code_bits)
        if self.margin_rank and build_params.get("margin_counts_rounding", False):
            self.rounding_variance = code_table.noise_variance
        if codes.ntotal * codes.d <= DECODED_FIRST_PASS_MAX:
            self.first_pass = code_table

    @property
    def effort_param(self) -> str:
        """`margin` (hundredths of σ_q) with an error basis, else `rerank`: candidates re-ranked
        per query (exactly, or from 8-bit keys)."""
        return "margin" if self.margin_rank else "rerank"

    def effort_range(self, k: int) -> tuple[int, int]:
        return (0, MAX_MARGIN) if self.margin_rank else super().effort_range(k)

    @property
    def margin_rank(self) -> int:
        basis = self.error_basis if self.error_basis_codes is None else self.error_basis_codes.codes
        return 0 if basis is None else len(basis)

    @property
    def error_basis_bits(self) -> int:
        return 32 if self.error_basis_codes is None else 8

    @property
    def code_bits(self) -> int:
        return 4 if self.codes.sq.qtype == QUANTIZER_TYPES[4] else 8

    @property
    def rerank_bits(self) -> int:
        return 32 if self.key_codes is None else 8

    @property
    def kept_bits(self) -> int:
        return self.build_params.get("kept_bits", 32)

    @property
    def projection_bits(self) -> int:
        return 32 if self.projector is None else 8

    @property
    def refine_rank(self) -> int:
        return self.build_params.get("refine_rank", 0)

    @property
    def refine_factor(self) -> float:
        return self.build_params.get("refine_factor", DEFAULT_REFINE_FACTOR)

    @property
    def exact_scores(self) -> bool:
        return self.kept_bits == 32

    @classmethod
    def parts_for(cls, build_params: dict[str, Any]) -> tuple[str, ...]:
        # Stores written before projection_bits existed hold the float32 projection.
        projection = ("projection",) if build_params.get("projection_bits", 32) == 32 else ()
        key_codes = ("key_codes", "key_ranges") if build_params.get("rerank_bits", 32) == 8 else ()
        refine = ("refine_codes", "refine_ranges") if build_params.get("refine_rank", 0) else ()
        # Stores written before error_basis_bits existed hold the float32 basis.
        error_basis = ()
        if build_params.get("margin_rank", 0):
            error_basis = (("error_basis",) if build_params.get("error_basis_bits", 32) == 32
                           else ("error_basis_codes", "error_basis_ranges"))
        return projection + key_codes + refine + error_basis

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        # No refinement by default: it saves bytes but made searches up to 2.2x slower on relu-lm and minilm-sparse.
        return {"rank": "auto", "projection_bits": 8, "code_bits": 8, "rerank_bits": 32, "kept_bits": 32,
                "refine_rank": 0, "refine_factor": DEFAULT_REFINE_FACTOR, "margin_rank": 0, "error_basis_bits": 8,
                "margin_counts_rounding": True}

    @classmethod
    def build(cls, keys: np.ndarray, queries: np.ndarray | None = None, k: int | None = None,
              target_recall: float | None = None, **build_params: Any) -> LowRankIndex:
        if queries is None or len(queries) == 0 or k is None:
            raise BackendError("the lowrank backend is built from calibration queries and k")
        num_keys, dim = keys.shape
        params = {**cls.default_build_params(num_keys, dim), **build_params}
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        for bits in ("projection_bits", "rerank_bits", "kept_bits", "error_basis_bits"):
            if params[bits] not in (8, 32):
                raise BackendError(f"{bits} must be 8 or 32, got {params[bits]!r}")
        if params["code_bits"] not in (4, 8):
            raise BackendError(f"code_bits must be 4 or 8, got {params['code_bits']!r}")
        if params["kept_bits"] == 8 and params["rerank_bits"] != 8:
            raise BackendError("kept_bits=8 scores the kept keys from the 8-bit key codes: it needs rerank_bits=8")
        if not isinstance(params["refine_factor"], (int, float)) or params["refine_factor"] < 1:
            raise BackendError(f"refine_factor must be a number >= 1, got {params['refine_factor']!r}")
        rank, refine_rank = params["rank"], params["refine_rank"]
        if rank != "auto" and (not isinstance(rank, int) or not 1 <= rank <= dim):
            raise BackendError(f"rank must be 'auto' or an integer in [1, {dim}], got {rank!r}")
        if refine_rank not in (0, "auto") and (not isinstance(refine_rank, int) or not 1 < refine_rank <= dim
                                               or rank != "auto" and rank >= refine_rank):
            raise BackendError(f"refine_rank must be 0, 'auto' or an integer in (rank, {dim}], got {refine_rank!r}")
        if refine_rank and params["projection_bits"] != 8:
            raise BackendError("refine_rank needs projection_bits=8 (the refined columns come from its codes)")
        margin_rank = params["margin_rank"]
        if not isinstance(margin_rank, int) or not 0 <= margin_rank <= dim:
            raise BackendError(f"margin_rank must be an integer in [0, {dim}], got {margin_rank!r}")
        if margin_rank and (refine_rank or params["projection_bits"] != 8):
            raise BackendError("margin_rank needs projection_bits=8 and no refine_rank")
        ranks = candidate_ranks(dim) if rank == "auto" else [rank]

        def refinements(first_rank: int) -> list[int]:
            if refine_rank == "auto":  # none, or 2 or 3 times the first pass's rank
                return [0, *(times * first_rank for times in (2, 3) if times * first_rank <= dim // 2)]
            return [refine_rank] if refine_rank == 0 or refine_rank > first_rank else []

        options = [(r, refine) for r in ranks for refine in refinements(r)]  # (rank, refine_rank)
        if not options:
            raise BackendError(f"refine_rank {refine_rank} must exceed a first-pass rank (considered: {ranks})")
        # One fit at the largest rank considered: its leading r columns are the rank-r fit.
        a, b = score_preserving_factors(keys, queries, max(max(option) for option in options))
        rank, refine_rank = options[0] if len(options) == 1 else cls._cheapest_ranks(
            keys, a, b, queries, k, target_recall or 0.95, params, options)
        params.update(rank=rank, refine_rank=refine_rank)
        quantized = {}
        if refine_rank:
            refined = RowCodes.encode(a[:, rank:refine_rank])
            quantized = {"refine_codes": refined.codes.numpy(), "refine_ranges": refined.ranges}
        rows = max(rank, refine_rank)  # of B: the projection computes the refinement's columns too
        a, b = np.ascontiguousarray(a[:, :rank]), np.ascontiguousarray(b[:rows])
        codes = faiss.IndexScalarQuantizer(rank, QUANTIZER_TYPES[params["code_bits"]], faiss.METRIC_INNER_PRODUCT)
        codes.train(a)
        codes.add(a)
        projection = b
        if params["projection_bits"] == 8:
            padded = np.zeros((rows, simd_padded(dim)), dtype=np.float32)  # (r2, D'): B, then zero columns
            padded[:, :dim] = b
            projection = faiss.IndexScalarQuantizer(padded.shape[1], faiss.ScalarQuantizer.QT_8bit,
                                                    faiss.METRIC_INNER_PRODUCT)
            projection.train(padded)
            projection.add(padded)
        if params["rerank_bits"] == 8:
            codes_of_keys = RowCodes.encode(keys)
            quantized.update(key_codes=codes_of_keys.codes.numpy(), key_ranges=codes_of_keys.ranges)
        if margin_rank:
            basis = residual_error_basis(keys, a, b, margin_rank)  # (t, D)
            if params["error_basis_bits"] == 8:
                coded = RowCodes.encode(basis)
                quantized.update(error_basis_codes=coded.codes.numpy(), error_basis_ranges=coded.ranges)
            else:
                quantized["error_basis"] = basis
        return cls(keys, codes, projection, params, {}, **quantized)

    @staticmethod
    def _cheapest_ranks(keys: np.ndarray, a: np.ndarray, b: np.ndarray, queries: np.ndarray, k: int,
                        target_recall: float, params: dict[str, Any],
                        options: list[tuple[int, int]]) -> tuple[int, int]:
        """The (rank, refine_rank) option with the fewest bytes per query at the target recall; the
        factors (a, b) are of the largest rank considered, whose leading r columns are the rank-r fit."""
        num_keys, dim = keys.shape
        sample = torch.from_numpy(queries[:: max(1, len(queries) // 2048)])  # (≤ 2048·2, D)
        # Ranked as the search will rank: by the codes (each column over its own range, so the
        # leading r columns' codes are the rank-r codes), whose rounding 4 bits make felt. A
        # refinement's columns, 8-bit in the index, are taken at the same precision: an estimate.
        coded = RowCodes.encode(a, params["code_bits"]).decode()  # (n, r_max)
        keys_t, a_t, b_t = torch.from_numpy(keys), coded, torch.from_numpy(b)
        true_top = true_top_k(keys_t, sample, k)  # (N, k): the same for every option

        def cost(option: tuple[int, int]) -> int:
            rank, refine_rank = option
            if refine_rank:
                rerank = refined_rerank_needed(keys_t, a_t, b_t, sample, k, target_recall, rank, refine_rank,
                                               params["refine_factor"], true_top)
            else:
                rerank = rerank_needed(keys_t, a_t[:, :rank], b_t[:rank], sample, k, target_recall, true_top)
            return bytes_per_query(num_keys, dim, rank, rerank, k, params["rerank_bits"], params["kept_bits"],
                                   params["projection_bits"], refine_rank, params["refine_factor"],
                                   code_bits=params["code_bits"])

        return min(options, key=cost)

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        effort = self.resolve_effort(k, search_params)
        rerank = 0 if self.margin_rank else effort
        q = np.ascontiguousarray(queries, dtype=np.float32)  # (N, D)
        q_t = torch.from_numpy(q)  # the same memory
        valid, within_margin = None, 0  # (N, c) bool: the candidates within the margin; how many in all
        if self.projector is None:
            _, candidates = self.projected_codes.search(q, rerank)  # (N, rerank) by approximate score
        else:
            projected = self._project(q)  # (N, r2)
            if self.margin_rank:
                candidates, valid, within_margin = self._within_margin(projected, q_t, k, effort / 100)
            elif self.refine_codes is None and self.first_pass is not None:
                scores = self.first_pass.dot_all(torch.from_numpy(projected))  # (N, n) approximate
                candidates = scores.topk(min(rerank, self.num_keys), dim=1).indices  # (N, rerank)
            elif self.refine_codes is None:
                _, candidates = self.codes.search(projected, rerank)  # (N, rerank) by approximate score
            else:
                candidates = self._refined_candidates(projected, rerank)
        candidates = torch.as_tensor(candidates)
        if self.key_codes is None:
            values, ids = best_candidates(self.keys, candidates, q_t, k, valid)
        else:
            values, ids = self._best_by_key_codes(candidates, q_t, k, valid)
        per_query = bytes_per_query(self.num_keys, self.dim, self.codes.d, rerank, k, self.rerank_bits, self.kept_bits,
                                    self.projection_bits, self.refine_rank, self.refine_factor, self.margin_rank,
                                    self.code_bits, self.error_basis_bits)
        return SearchResult(values.numpy(), ids.numpy(), keys_scored=len(q) * self.num_keys,
                            bytes_read=len(q) * per_query + within_margin * self.dim * self.rerank_bits // 8)

    def _project(self, q: np.ndarray) -> np.ndarray:
        """q Bᵀ from the 8-bit projection: q (N, D) -> (N, r2)."""
        n_queries, num_rows = len(q), self.projector.ntotal
        padded = np.zeros((n_queries, self.projector.d), dtype=np.float32)  # (N, D'): q, then zeros
        padded[:, :self.dim] = q
        row_scores = np.empty((n_queries, num_rows), dtype=np.float32)  # q·B_j for every row j, best first
        rows = np.empty((n_queries, num_rows), dtype=np.int64)
        # The C entry point: the wrapper's checks and copies cost as much as this tiny search.
        self.projector.search_c(n_queries, faiss.swig_ptr(padded), num_rows, faiss.swig_ptr(row_scores),
                                faiss.swig_ptr(rows))
        projected = np.empty_like(row_scores)
        projected[np.arange(n_queries)[:, None], rows] = row_scores  # q Bᵀ in row order
        return projected

    def _score_error(self, q: torch.Tensor, first: np.ndarray) -> torch.Tensor:
        """σ_q, each query's expected approximate score error: the factorisation's residual as far
        as the error basis carries it, and the codes' rounding where the store counts it (even 8-bit
        rounding widens σ_q by 0.5-10 % on minilm-sparse's layers). q (N, D), first (N, r) = q Bᵀ -> (N,).
        """
        residual = q @ self.error_basis.T if self.error_basis_codes is None else self.error_basis_codes.dot_all(q)  # (N, t)
        variance = residual.square().sum(1)  # (N,)
        if self.rounding_variance is not None:
            variance = variance + torch.from_numpy(first).square() @ self.rounding_variance
        return variance.sqrt()

    def _within_margin(self, projected: np.ndarray, q: torch.Tensor, k: int,
                       margin: float) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Each query's keys whose approximate score is within margin·σ_q of its k-th best, best first:
        projected (N, r), q (N, D) -> (candidates (N, c), valid (N, c) bool or None when every
        slot is, candidates in all). c is the widest query's count; narrower rows are padded.

        Small layers score every key from the decoded codes; larger ones let faiss' scan keep
        the best `width` per query, sorted, the width starting from the widest count of the
        last search and doubling until every query's margin ends inside it.
        """
        first = np.ascontiguousarray(projected[:, :self.codes.d])  # (N, r)
        sigma = self._score_error(q, first)  # (N,)
        if self.first_pass is not None:
            scores = self.first_pass.dot_all(torch.from_numpy(first))  # (N, n)
            counts = (scores >= scores.topk(k, dim=1).values[:, -1:] - margin * sigma[:, None]).sum(1)  # (N,) >= k
            candidates = scores.topk(int(counts.max()), dim=1).indices  # (N, c)
        else:
            width = min(self.num_keys, max(2 * k, self._margin_width))
            while True:
                scores, ranked = self.codes.search(first, width)  # (N, width) by approximate score
                counts = torch.from_numpy((scores >= (scores[:, k - 1] - margin * sigma.numpy())[:, None]).sum(1))
                if width == self.num_keys or counts.max() < width:
                    break
                width = min(self.num_keys, 2 * width)
            widest = int(counts.max())
            self._margin_width = round_up_16(widest * 5 // 4)
            candidates = torch.from_numpy(ranked[:, :widest])  # (N, c)
        widest, total = candidates.shape[1], int(counts.sum())
        valid = None if total == widest * len(q) else torch.arange(widest) < counts[:, None]
        return candidates, valid, total

    def _refined_candidates(self, projected: np.ndarray, rerank: int) -> np.ndarray:
        """The best `rerank` by rank-r2 score among the best refine_factor·rerank by rank-r score:
        projected (N, r2) -> (N, rerank)."""
        rank = self.codes.d
        num_first = refined_candidates(self.num_keys, rerank, self.refine_factor)
        first_scores, first = self.codes.search(np.ascontiguousarray(projected[:, :rank]), num_first)  # (N, R1)
        first_t = torch.from_numpy(first)
        further = self.refine_codes.dot(first_t, torch.from_numpy(projected[:, rank:]))  # (N, R1): columns r..r2
        refined = torch.from_numpy(first_scores) + further  # (N, R1): rank-r2 scores
        return first_t.gather(1, refined.topk(rerank, dim=1).indices).numpy()  # (N, rerank)

    def _best_by_key_codes(self, candidates: torch.Tensor, q: torch.Tensor, k: int,
                           valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best candidates by their 8-bit keys, scored exactly unless kept_bits = 8:
        candidates (N, R), q (N, D), valid (N, R) bool or None (all) -> (scores, ids) (N, k)."""
        coarse = self.key_codes.dot(candidates, q)  # (N, R)
        if valid is not None:
            coarse = coarse.masked_fill(~valid, -torch.inf)
        best, order = coarse.topk(min(k, candidates.shape[1]), dim=1)  # (N, k)
        kept = candidates.gather(1, order)  # (N, k)
        return (best, kept) if self.kept_bits == 8 else (rows_dot(self.keys, kept, q), kept)

    def arrays(self) -> dict[str, np.ndarray]:
        arrays = {} if self.projection is None else {"projection": self.projection}
        for name, table in (("key", self.key_codes), ("refine", self.refine_codes),
                            ("error_basis", self.error_basis_codes)):
            if table is not None:
                arrays.update({f"{name}_codes": table.codes.numpy(), f"{name}_ranges": table.ranges})
        if self.error_basis is not None:
            arrays["error_basis"] = self.error_basis.numpy()
        return arrays

    def save(self, folder: Path, stem: str) -> list[str]:
        indexes = {"codes": self.codes, **({} if self.projector is None else {"projection": self.projector})}
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
        parts: dict[str, Any] = cls.load_arrays(folder, stem, build_params)
        if build_params.get("projection_bits", 32) == 8:
            parts["projection"] = projector = faiss.read_index(str(Path(folder) / f"{stem}.projection.faiss"))
            if projector.ntotal != max(codes.d, build_params.get("refine_rank", 0)):
                raise BackendError(f"{stem}: a rank-{projector.ntotal} projection for rank-{codes.d} codes")
        return cls(keys, codes=codes, **parts, build_params=build_params, search_params=search_params)
