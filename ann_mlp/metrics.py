"""Fidelity metrics as plain functions over tensors (exact vs approximate)."""

from __future__ import annotations

import torch


def kth_largest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores (N, n) -> (N,) the k-th largest score per row: the top-k threshold."""
    return torch.topk(scores, k, dim=1).values[:, -1]


def recall_at_k(exact_scores: torch.Tensor, retrieved: torch.Tensor, k: int) -> torch.Tensor:
    """Tie-aware recall@k per query.

    exact_scores (N, n) full-precision scores of every key; retrieved (N, k)
    ids, -1 for missing. Keys strictly above the k-th largest score must be
    found; the remaining slots may be filled by any of the keys tied at it.
    """
    threshold = kth_largest(exact_scores, k)[:, None]  # (N, 1)
    valid = retrieved >= 0  # (N, k)
    got = exact_scores.gather(1, retrieved.clamp_min(0))  # (N, k)
    above = ((got > threshold) & valid).sum(dim=1)  # (N,)
    tied = ((got == threshold) & valid).sum(dim=1)  # (N,)
    slots_for_ties = k - (exact_scores > threshold).sum(dim=1)  # (N,)
    return (above + torch.minimum(tied, slots_for_ties)).float() / k


def mass_recall(activations: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
    """Share of sum |h| over all neurons captured by the retrieved ones, per query.

    activations (N, n) exact activations h (gated: act(g) * u); retrieved (N, k).
    """
    valid = retrieved >= 0
    captured = (activations.abs().gather(1, retrieved.clamp_min(0)) * valid).sum(dim=1)  # (N,)
    total = activations.abs().sum(dim=1).clamp_min(torch.finfo(activations.dtype).tiny)
    return captured / total


def relative_errors(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """Per-row relative L2 error ||approx - exact|| / ||exact||; (N, d) -> (N,).

    Averaged per token rather than pooled: a few tokens with huge MLP outputs
    (e.g. separators) would otherwise dominate and hide the typical error.
    """
    norm = exact.norm(dim=1).clamp_min(torch.finfo(exact.dtype).tiny)
    return (approx - exact).norm(dim=1) / norm


def total_relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """sqrt(sum ||approx - exact||^2 / sum ||exact||^2) over rows (N, d): the error as the residual
    stream receives it, rows with larger outputs weighing more.

    It decides whether a tail map is kept. The per-row mean of relative_errors can rise when the
    map lowers this: a map that moves every token's output a little towards the average residual
    adds a small error to the many tokens that had almost none. On relu-lm (mass 0.95, exact
    top-k) that trade raised the mean from 0.028 to 0.040 and lowered the end-to-end KL from
    0.009 to 0.003.
    """
    error = (approx - exact).square().sum()
    return float((error / exact.square().sum().clamp_min(torch.finfo(exact.dtype).tiny)).sqrt())


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of (N, d) tensors."""
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


def nearest_neighbour_agreement(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """Share of rows whose nearest other row (by cosine) is the same under both embeddings."""
    if exact.shape[0] < 2:
        return 1.0

    def nearest(embeddings: torch.Tensor) -> torch.Tensor:
        unit = torch.nn.functional.normalize(embeddings, dim=1)
        sims = unit @ unit.T  # (N, N)
        sims.fill_diagonal_(-float("inf"))
        return sims.argmax(dim=1)

    return float((nearest(exact) == nearest(approx)).float().mean())


def kl_divergence(exact_logits: torch.Tensor, approx_logits: torch.Tensor) -> torch.Tensor:
    """KL(exact || approx) per position; logits (N, V) -> (N,)."""
    log_p = torch.log_softmax(exact_logits.float(), dim=-1)
    log_q = torch.log_softmax(approx_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target token; logits (N, V), targets (N,) -> (N,)."""
    return torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
