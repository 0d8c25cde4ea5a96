"""MLP activations, including the sparse ones ann-mlp trains and serves.

A checkpoint's config may record, besides the family's own activation name:
- `ann_mlp_topk = K`: the Top-k Transformer (Li et al. 2022) keeps only the K
  largest pre-activations per token, then applies its activation to them;
- `ann_mlp_threshold = t`: FATReLU (ProSparse, Song et al. 2024) zeroes every
  neuron whose pre-activation is not above t.
ann-mlp installs the module below when it loads such a checkpoint, so the exact
model, the approximate model and every report agree on what the MLP computes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN


class SparseActivation(nn.Module):
    """act(x) on the neurons that survive a Top-k and/or a threshold; zero elsewhere."""

    def __init__(self, activation: str, topk: int | None = None, threshold: float | None = None) -> None:
        super().__init__()
        self.activation = activation
        self.topk = topk
        self.threshold = threshold
        self.act = ACT2FN[activation]

    def extra_repr(self) -> str:
        return f"activation={self.activation}, topk={self.topk}, threshold={self.threshold}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., d_ff)
        out = self.act(x)
        if self.threshold is not None:
            out = out.masked_fill(x <= self.threshold, 0.0)
        if self.topk and self.topk < x.shape[-1]:
            top = torch.topk(x, self.topk, dim=-1).indices
            out = torch.zeros_like(out).scatter(-1, top, out.gather(-1, top))
        return out


def activation_module(activation: str, topk: int | None = None, threshold: float | None = None) -> nn.Module:
    """The module computing an MLP's activation over all of its d_ff pre-activations."""
    if topk or threshold is not None:
        return SparseActivation(activation, topk, threshold)
    return ACT2FN[activation]
