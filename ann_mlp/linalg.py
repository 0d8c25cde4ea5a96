"""Small tensor kernels shared by the MLP module and the backends (pure torch, no model code)."""

from __future__ import annotations

import torch


def rows_dot(rows: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, max_gathered: int = 1 << 22) -> torch.Tensor:
    """Inner products of each query with its own selected rows.

    rows (n, d), ids (N, k), x (N, d) -> (N, k). Queries are taken in chunks so the
    gathered (chunk, k, d) block stays bounded. When the selection is a large share
    of the rows, one matmul and a gather beat gathering the rows.
    """
    n_queries, k = ids.shape
    dense = k * 4 > rows.shape[0]
    chunk = max(1, max_gathered // max(1, (rows.shape[0] if dense else k) * rows.shape[1]))
    out = torch.empty(n_queries, k, dtype=torch.float32)
    for start in range(0, n_queries, chunk):
        stop = start + chunk
        if dense:
            out[start:stop] = (x[start:stop].float() @ rows.float().T).gather(1, ids[start:stop])
        else:
            gathered = rows[ids[start:stop]].float()  # (chunk, k, d)
            out[start:stop] = torch.einsum("nkd,nd->nk", gathered, x[start:stop].float())
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, as sentence-transformers pools MiniLM: (B, T, d), (B, T) -> (B, d)."""
    weights = mask.unsqueeze(-1).float()  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def best_candidates(rows: torch.Tensor, candidates: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact re-rank: each query's k best rows among its own candidates.

    rows (n, d), candidates (N, c) int64, x (N, d) -> (scores (N, k) float32, ids (N, k) int64),
    padded with -inf / -1 when there are fewer than k candidates.
    """
    scores = rows_dot(rows, candidates, x)  # (N, c)
    top = scores.topk(min(k, candidates.shape[1]), dim=1)
    values, ids = top.values, candidates.gather(1, top.indices)
    if candidates.shape[1] < k:
        missing = k - candidates.shape[1]
        values = torch.nn.functional.pad(values, (0, missing), value=-torch.inf)
        ids = torch.nn.functional.pad(ids, (0, missing), value=-1)
    return values, ids
