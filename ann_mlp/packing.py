"""Inputs of unlike lengths packed end to end into rows, so one forward pass wastes no padding.

A padded batch computes every layer's projections for rows x longest positions; with short
texts of mixed lengths that is up to twice the real tokens, and cutting the batch into passes
of like lengths instead costs a pass's fixed overhead each time. Packing lays the inputs end to
end into rows no longer than the longest one (first fit, longest first), gives each its own
positions from 0, and lets a token attend only to tokens of its own input (a block-diagonal
mask). The hidden states are then the padded batch's up to float32 summation order: each input
still sees exactly its own tokens at its own positions. A row is never longer than the longest
input, so attention costs no more than in the padded batch.

Only families whose adapter can feed packed rows (`FamilyAdapter.packs_inputs`) pack; for the
rest `pack` returns None and the padded batch runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ann_mlp.checkpoint.base import FamilyAdapter


@dataclass
class Packing:
    """A padded batch's inputs laid end to end in rows, and the way back."""

    inputs: dict[str, torch.Tensor]  # keyword arguments of model.forward over the packed rows
    places: torch.Tensor  # (B, T) long: each padded position's place among the packed rows' positions
    mask: torch.Tensor  # (B, T): the padded batch's real tokens

    def forward(self, model: torch.nn.Module):
        """The model's output over the packed rows, as the padded batch's: last_hidden_state
        (B, T, d_model), zero at padding. Outputs that mix a row's inputs (a pooler over each
        row's first token) have no per-input meaning here and are left out."""
        output = model(**self.inputs)
        hidden = output.last_hidden_state  # (R, L, d)
        flat = hidden.reshape(-1, hidden.shape[-1])  # (R*L, d)
        unpacked = flat[self.places] * self.mask.unsqueeze(-1)  # (B, T, d)
        return type(output)(last_hidden_state=unpacked)


def packed_rows(lengths: list[int]) -> list[list[int]]:
    """Input indices per row: first fit, longest first, into rows as long as the longest input.
    Every row but one is more than half full, so the rows hold under twice the real tokens plus a row."""
    width = max(lengths)
    rows: list[list[int]] = []
    room: list[int] = []  # free positions per row
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def pack(adapter: FamilyAdapter, input_ids: torch.Tensor, mask: torch.Tensor) -> Packing | None:
    """The padded batch (input_ids, mask: (B, T), right-padded) packed into rows; None when the
    family cannot take packed rows or packing would save no position."""
    if not adapter.packs_inputs:
        return None
    lengths = mask.sum(1).tolist()
    width = max(lengths)
    rows = packed_rows(lengths)
    if len(rows) == len(lengths):
        return None  # every input alone in its row: the padded batch itself
    packed_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L); padding's id does not matter
    positions = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # (R, L): input index, -1 at padding
    places = torch.zeros(mask.shape, dtype=torch.long)  # (B, T)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            n = lengths[i]
            packed_ids[r, start : start + n] = input_ids[i, :n]
            positions[r, start : start + n] = torch.arange(n)
            owner[r, start : start + n] = i
            places[i, :n] = r * width + start + torch.arange(n)
            start += n
    same_input = (owner.unsqueeze(2) == owner.unsqueeze(1)) & (owner >= 0).unsqueeze(2)  # (R, L, L)
    same_input |= torch.eye(width, dtype=torch.bool)  # a padded position attends to itself: no empty softmax
    # Additive, in the model's dtype: every attention implementation adds a float mask as it is
    # (eager would add a boolean one as 0 and 1).
    dtype = adapter.model.dtype
    attention = torch.zeros(same_input.shape, dtype=dtype).masked_fill(~same_input, torch.finfo(dtype).min)
    return Packing(adapter.packed_inputs(packed_ids, positions, attention.unsqueeze(1)), places, mask)
