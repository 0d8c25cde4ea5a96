"""MLP activations, including the Top-k of the Top-k Transformer (Li et al. 2022).

A checkpoint whose config records `ann_mlp_topk = K` keeps only the K largest
pre-activations per token (then applies its activation to them); ann-mlp
installs that module when it loads such a checkpoint, so the exact model, the
approximate model and every report agree on what the MLP computes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class TopK(nn.Module):
    """Keep the k largest pre-activations per token, activate them, zero the rest."""

    def __init__(self, k: int, activation: str = "relu") -> None:
        super().__init__()
        self.k = k
        self.activation = activation
        self.act = ACT2FN[activation]

    def extra_repr(self) -> str:
        return f"k={self.k}, activation={self.activation}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_ff)
        if self.k >= x.shape[-1]:
            return self.act(x)
        top = torch.topk(x, self.k, dim=-1)
        return torch.zeros_like(x).scatter(-1, top.indices, self.act(top.values))


def activation_module(activation: str, topk: int | None = None) -> nn.Module:
    """The module computing an MLP's activation over all of its d_ff pre-activations."""
    return TopK(topk, activation) if topk else ACT2FN[activation]
