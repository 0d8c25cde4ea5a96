"""The low-rank backend's fit: factors that preserve the scores real queries produce, and the
rank whose search reads the fewest bytes at a target recall.

A rank-r factorisation K ≈ A B is fit to the queries the model actually sends: it minimises
E_q ||(K − A B) q||² over real calibration queries, i.e. the error of the scores, not of the keys
(truncated SVD of K C^½ with C = E[q qᵀ], then B = Vᵣᵀ C^−½). Hidden states live in a few
directions, so a small r ranks the neurons almost as the exact scores do.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from ann_mlp.index.low_rank_cost import LowRankParams, bytes_per_query, refined_candidates
from ann_mlp.linalg import RowCodes
from ann_mlp.tuning import smallest_reaching

QUERY_CHUNK = 512  # queries scored at once when fitting: their (chunk, n) score matrices stay small
RANK_SAMPLE = 2048  # about this many calibration queries price each rank


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


def residual_error_basis(keys: np.ndarray, a: np.ndarray, b: np.ndarray, rank: int) -> np.ndarray:
    """E (t, D) with ||E q||² the mean over keys of (q · (k_i − a_i B))², as far as the residual's
    `rank` leading directions carry it: keys (n, D), a (n, r), b (r, D)."""
    residual = torch.from_numpy(keys).double() - torch.from_numpy(a).double() @ torch.from_numpy(b).double()  # (n, D)
    eigenvalues, eigenvectors = torch.linalg.eigh(residual.T @ residual / len(keys))  # ascending
    leading = eigenvectors[:, -rank:] * eigenvalues[-rank:].clamp_min(0).sqrt()  # (D, t)
    return leading.T.float().numpy()


def true_top_k(keys: torch.Tensor, queries: torch.Tensor, k: int) -> torch.Tensor:
    """Each query's exact top k: keys (n, D), queries (N, D) -> ids (N, k)."""
    return torch.cat([(chunk @ keys.T).topk(k, dim=1).indices for chunk in queries.split(QUERY_CHUNK)])


def rerank_needed(
    keys: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    target_recall: float,
    true_top: torch.Tensor | None = None,
) -> int:
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


def refined_rerank_needed(
    keys: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    queries: torch.Tensor,
    k: int,
    target_recall: float,
    rank: int,
    refine_rank: int,
    refine_factor: float,
    true_top: torch.Tensor | None = None,
) -> int:
    """Candidates to re-score (`rerank`) so that mean recall@k reaches the target when the best
    refine_factor·rerank by rank-r score are re-ordered by rank-r2 score and the best rerank kept.

    keys (n, D), a (n, ≥ r2), b (≥ r2, D), queries (N, D), true_top (N, k) as for rerank_needed.
    Recall grows with rerank (the candidate sets are nested), so the smallest is found by bisection.
    """
    num_keys = len(keys)
    true_top = true_top_k(keys, queries, k) if true_top is None else true_top
    chunks = []  # per chunk of queries: true top-k (c, k), rank-r scores (c, n), rank-r2 scores (c, n)
    for chunk, chunk_top in zip(queries.split(QUERY_CHUNK), true_top.split(QUERY_CHUNK)):  # (c, D), (c, k)
        projected = chunk @ b[:refine_rank].T  # (c, r2)
        chunks.append((chunk_top, projected[:, :rank] @ a[:, :rank].T, projected @ a[:, :refine_rank].T))

    def reaches(rerank: int) -> bool:
        hits = 0.0
        for true_ids, first_scores, refined_scores in chunks:
            first = first_scores.topk(refined_candidates(num_keys, rerank, refine_factor), dim=1).indices  # (c, R1)
            kept = first.gather(1, refined_scores.gather(1, first).topk(rerank, dim=1).indices)  # (c, rerank)
            found = torch.zeros_like(first_scores, dtype=torch.bool).scatter_(1, kept, True)  # (c, n)
            hits += found.gather(1, true_ids).sum().item()
        return hits / (len(queries) * k) >= target_recall

    return smallest_reaching(k, num_keys, reaches)


def candidate_ranks(dim: int) -> list[int]:
    """D/32 ... D/2 in steps of about 1.4×, multiples of 8 (the codes' SIMD width), at least 8."""
    return sorted({min(dim, max(8, dim // divisor // 8 * 8)) for divisor in (32, 24, 16, 12, 8, 6, 4, 3, 2)})


def rank_options(params: LowRankParams, dim: int) -> list[tuple[int, int]]:
    """The (rank, refine_rank) pairs the build considers for `params` (rank or refine_rank may be "auto")."""
    ranks = candidate_ranks(dim) if params.rank == "auto" else [params.rank]

    def refinements(first_rank: int) -> list[int]:
        if params.refine_rank == "auto":  # none, or 2 or 3 times the first pass's rank
            return [0, *(times * first_rank for times in (2, 3) if times * first_rank <= dim // 2)]
        return [params.refine_rank] if params.refine_rank == 0 or params.refine_rank > first_rank else []

    return [(rank, refine) for rank in ranks for refine in refinements(rank)]


def cheapest_ranks(
    keys: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    queries: np.ndarray,
    k: int,
    target_recall: float,
    params: LowRankParams,
    options: list[tuple[int, int]],
) -> tuple[int, int]:
    """The (rank, refine_rank) option with the fewest bytes per query at the target recall; the
    factors (a, b) are of the largest rank considered, whose leading r columns are the rank-r fit.
    Priced without a margin: the margin's cost depends on the rank only through its basis."""
    num_keys, dim = keys.shape
    sample = torch.from_numpy(queries[:: max(1, len(queries) // RANK_SAMPLE)])  # (≤ 2·RANK_SAMPLE, D)
    # Ranked as the search will rank: by the codes (each column over its own range, so the leading
    # r columns' codes are the rank-r codes), whose rounding 4 bits make felt. A refinement's
    # columns, 8-bit in the index, are taken at the same precision: an estimate.
    coded = RowCodes.encode(a, params.code_bits).decode()  # (n, r_max)
    keys_t, b_t = torch.from_numpy(keys), torch.from_numpy(b)
    true_top = true_top_k(keys_t, sample, k)  # (N, k): the same for every option

    def cost(option: tuple[int, int]) -> int:
        rank, refine_rank = option
        if refine_rank:
            rerank = refined_rerank_needed(
                keys_t, coded, b_t, sample, k, target_recall, rank, refine_rank, params.refine_factor, true_top
            )
        else:
            rerank = rerank_needed(keys_t, coded[:, :rank], b_t[:rank], sample, k, target_recall, true_top)
        priced = replace(params, rank=rank, refine_rank=refine_rank, margin_rank=0)
        return bytes_per_query(priced, num_keys, dim, rerank, k)

    return min(options, key=cost)
