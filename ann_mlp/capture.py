"""Run a checkpoint over real text in batches, capturing each MLP's input tokens."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from ann_mlp.checkpoint import Checkpoint
from ann_mlp.config import TextConfig
from ann_mlp.errors import InputError


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of model.forward
    mask: torch.Tensor  # (B, T) bool: real tokens (not padding)
    input_ids: torch.Tensor  # (B, T)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def make_batch(checkpoint: Checkpoint, texts: list[str], max_seq_len: int) -> Batch:
    encoded = checkpoint.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                   max_length=max_seq_len)
    return _batch(checkpoint, encoded["input_ids"], encoded["attention_mask"])


def batch_from_ids(checkpoint: Checkpoint, token_ids: list[list[int]]) -> Batch:
    """Right-padded batch of already tokenized inputs."""
    longest = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), longest), checkpoint.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[row, : len(ids)] = 1
    return _batch(checkpoint, input_ids, mask)


def _batch(checkpoint: Checkpoint, input_ids: torch.Tensor, mask: torch.Tensor) -> Batch:
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    if checkpoint.kind == "seq2seq":
        # Teacher-forced reconstruction of the input: the decoder runs on real text too.
        inputs["labels"] = input_ids.masked_fill(mask == 0, -100)
    return Batch(inputs=inputs, mask=mask.bool(), input_ids=input_ids)


def batches(checkpoint: Checkpoint, passages: Iterable[str], text: TextConfig) -> Iterator[Batch]:
    """Batches of passages until `text.max_tokens` real tokens; an error if there is no text."""
    total, pending = 0, []
    for passage in passages:
        pending.append(passage)
        if len(pending) == text.batch_size:
            batch = make_batch(checkpoint, pending, text.max_seq_len)
            pending = []
            total += batch.num_tokens
            yield batch
            if total >= text.max_tokens:
                return
    if pending:
        total += (batch := make_batch(checkpoint, pending, text.max_seq_len)).num_tokens
        yield batch
    if total == 0:
        raise InputError("the text is empty: no tokens to run")


def forward(checkpoint: Checkpoint, batch: Batch):
    with torch.inference_mode():
        return checkpoint.model(**batch.inputs)


def forward_capturing(checkpoint: Checkpoint, batch: Batch, layers: Iterable[int]):
    """One forward pass; returns (model output, {layer: MLP inputs of real tokens (n_tokens, d_model)})."""
    captured: dict[int, torch.Tensor] = {}
    token_mask = batch.mask.reshape(-1)  # (B*T,)
    handles = []
    for layer in layers:
        module = checkpoint.model.get_submodule(checkpoint.adapter.mlp_input_path(layer))

        def hook(_module, args, layer=layer):
            x = args[0]
            captured[layer] = x.reshape(-1, x.shape[-1])[token_mask].float().clone()  # (n_tokens, d_model)

        handles.append(module.register_forward_pre_hook(hook))
    try:
        output = forward(checkpoint, batch)
    finally:
        for handle in handles:
            handle.remove()
    return output, captured
