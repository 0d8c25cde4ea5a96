"""A causal LM cut into contiguous groups of decoder layers, each runnable on its own.

For models larger than one machine: each group holds only its layers' weights and indexes, keeps
its own KV cache, and passes one hidden state (d_model per token) to the next. The first group
embeds the token ids; a later group takes the hidden state as `inputs_embeds`, with the learned
position embeddings (OPT, GPT-2) zeroed, since the first group has added them; every group but
the last skips the final norm, and the last returns the logits. Each group renumbers its
attention layers from 0, so its cache holds its own layers only.

A group is built from the whole store and then drops the other layers: enough to show the
split and measure its hops on one machine; loading only a group's own shards is what a model
larger than one machine still needs (docs/layer-groups.md).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import DynamicCache

from ann_mlp.approx_model import ApproxModel
from ann_mlp.errors import InputError

Mode = Literal["exact", "approx", "auto"]


@dataclass(frozen=True)
class Stack:
    """Where a family keeps its decoder stack: module paths below the causal LM."""

    body: str  # the decoder without the head
    layers: str  # the layer list, below body
    final_norm: str  # below body
    positions: str | None  # learned position embeddings added to the input, below body (None: rotary)


STACKS = {
    "opt": Stack("model.decoder", "layers", "final_layer_norm", "embed_positions"),
    "gpt2": Stack("transformer", "h", "ln_f", "wpe"),
    "llama": Stack("model", "layers", "norm", None),
    "mistral": Stack("model", "layers", "norm", None),
    "qwen2": Stack("model", "layers", "norm", None),
}


class NoPositions(nn.Module):
    """Zero in place of learned position embeddings: the first group has added them."""

    def forward(self, *_args, **_kwargs) -> torch.Tensor:
        return torch.zeros(())


def split_points(num_layers: int, groups: int) -> list[tuple[int, int]]:
    """[start, stop) of `groups` contiguous runs of layers, as equal as they divide."""
    if not 1 <= groups <= num_layers:
        raise InputError(f"groups must be in [1, {num_layers}] (the model's layers), got {groups}")
    bounds = [round(i * num_layers / groups) for i in range(groups + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


class LayerGroup:
    """Layers [start, stop) of a store's causal LM, in one mode, with one KV cache per sequence."""

    def __init__(self, store: str | Path, start: int, stop: int, mode: Mode = "auto") -> None:
        self.approx = ApproxModel.open(store)
        checkpoint = self.approx.checkpoint
        if checkpoint.kind != "causal_lm":
            raise InputError(f"layer groups split a causal LM; {self.approx.manifest.name} is a {checkpoint.kind}")
        family = self.approx.manifest.family
        if family not in STACKS:
            raise InputError(f"layer groups know the families {', '.join(STACKS)}, not {family}")
        self.model = checkpoint.model
        self.num_layers = checkpoint.adapter.num_layers()
        if not 0 <= start < stop <= self.num_layers:
            raise InputError(f"layers [{start}, {stop}) are not within the model's {self.num_layers}")
        self.start, self.stop, self.mode = start, stop, mode
        self._modes = ExitStack()
        if mode != "exact":  # patch every MLP before the other layers go: paths count from the whole stack
            self._modes.enter_context(self.approx.approximate(planned=mode == "auto"))
        stack = STACKS[family]
        self.body = self.model.get_submodule(stack.body)
        kept = nn.ModuleList(list(self.body.get_submodule(stack.layers))[start:stop])
        setattr(self.body, stack.layers, kept)
        for index, layer in enumerate(kept):
            for module in layer.modules():
                if hasattr(module, "layer_idx"):
                    module.layer_idx = index  # this group's cache holds its own layers only
        self.model.config.num_hidden_layers = stop - start
        if start > 0 and stack.positions is not None:
            setattr(self.body, stack.positions, NoPositions())
        if not self.last:
            setattr(self.body, stack.final_norm, nn.Identity())
        self.caches: dict[str, DynamicCache] = {}

    @property
    def first(self) -> bool:
        return self.start == 0

    @property
    def last(self) -> bool:
        return self.stop == self.num_layers

    def forward(self, sequence: str, inputs: torch.Tensor) -> torch.Tensor:
        """One pass of one sequence (batch 1, no padding) through this group's layers, extending its
        cache: token ids (1, T) in the first group, else the previous group's hidden state
        (1, T, d_model). Returns the hidden state (1, T, d_model), or in the last group the
        next-token logits (1, V)."""
        cache = self.caches.setdefault(sequence, DynamicCache(config=self.model.config))
        given = {"input_ids": inputs} if self.first else {"inputs_embeds": inputs}
        with torch.inference_mode():
            if self.last:
                return self.model(**given, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]  # (1, V)
            return self.body(**given, cache=cache, use_cache=True).last_hidden_state  # (1, T, d_model)

    def release(self, sequence: str) -> None:
        """Forget a finished sequence's cache."""
        self.caches.pop(sequence, None)


def pipeline_generate(groups: list, prompt: list[int], max_new_tokens: int, sequence: str = "0") -> list[int]:
    """Greedy tokens of `prompt` through groups in order, one hop per group boundary per step.

    groups: anything with forward(sequence, inputs) and release(sequence), e.g. LayerGroups in
    this process, or wrappers around remote ones."""
    inputs = torch.tensor([prompt])  # (1, T)
    tokens: list[int] = []
    try:
        for _ in range(max_new_tokens):
            x = inputs
            for group in groups:
                x = group.forward(sequence, x)
            token = int(x.argmax(-1))  # x: (1, V) logits of the last group
            tokens.append(token)
            inputs = torch.tensor([[token]])  # (1, 1)
    finally:
        for group in groups:
            group.release(sequence)
    return tokens
