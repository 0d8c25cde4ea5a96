"""Run a checkpoint over real text in batches, capturing each MLP's input tokens."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import islice

import torch

from ann_mlp.checkpoint import Checkpoint, release_mapped_weights
from ann_mlp.config import TextConfig
from ann_mlp.errors import InputError
from ann_mlp.packing import pack


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of model.forward
    mask: torch.Tensor  # (B, T) bool: real tokens (not padding)
    input_ids: torch.Tensor  # (B, T)

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def make_batch(checkpoint: Checkpoint, texts: list[str], max_seq_len: int) -> Batch:
    encoded = checkpoint.tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_seq_len)
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


@dataclass
class TextStats:
    """How much text a run measured: filled in by `batches` as it reads."""

    passages: int = 0  # passages read
    sequences: int = 0  # sequences run: a split passage counts once per window
    tokens: int = 0  # real tokens run
    split: int = 0  # passages longer than the limit, run as several windows
    truncated: int = 0  # passages longer than the limit, cut to their first window
    limit: int = 0  # the passage limit in tokens
    whole_text: bool = False  # every passage was read (False: the token budget ended the run)

    def warnings(self) -> list[str]:
        notes = []
        if self.tokens < MIN_REPORTED_TOKENS:
            notes.append(
                f"only {self.tokens} tokens measured: figures from fewer than {MIN_REPORTED_TOKENS} tokens are noisy"
            )
        if self.truncated * 4 > self.passages:
            notes.append(f"{self.truncated} of {self.passages} passages were cut at {self.limit} tokens")
        return notes

    def to_json(self) -> dict:
        return {**asdict(self), "warnings": self.warnings()}


MIN_REPORTED_TOKENS = 1_000


def passage_limit(checkpoint: Checkpoint, text: TextConfig) -> int:
    """Tokens per sequence: the configured limit, or the model's positions if fewer."""
    positions = getattr(checkpoint.model.config, "max_position_embeddings", None)
    return min(text.max_seq_len, positions) if positions else text.max_seq_len


def batches(
    checkpoint: Checkpoint, passages: Iterable[str], text: TextConfig, stats: TextStats | None = None
) -> Iterator[Batch]:
    """Batches of `text.batch_size` sequences until `text.max_tokens` real tokens; an error if there
    is no text. A passage longer than the limit is split into windows of the limit (every token
    run) or cut to its first (text.long_passages); `stats` counts what was read."""
    stats = TextStats() if stats is None else stats
    stats.limit = limit = passage_limit(checkpoint, text)
    tokenizer = checkpoint.tokenizer
    # Sequences waiting for a batch: (token ids, how their passage was handled if this is its first
    # window: "whole", "split" or "cut"; None for a later window), so stats count what was run.
    pending: list[tuple[list[int], str | None]] = []

    def run(sequences: list[tuple[list[int], str | None]]) -> Batch:
        for _, first in sequences:
            if first is not None:
                stats.passages += 1
                stats.split += first == "split"
                stats.truncated += first == "cut"
        batch = batch_from_ids(checkpoint, [ids for ids, _ in sequences])
        stats.sequences += len(sequences)
        stats.tokens += batch.num_tokens
        return batch

    stream = iter(passages)
    while True:
        chunk = list(islice(stream, text.batch_size))
        if not chunk:
            stats.whole_text = True
            break
        encoded = tokenizer(
            chunk, truncation=True, max_length=limit, return_overflowing_tokens=True, add_special_tokens=True
        )
        windows: list[list[list[int]]] = [[] for _ in chunk]  # per passage, its windows in order
        for ids, passage in zip(encoded["input_ids"], encoded["overflow_to_sample_mapping"]):
            if ids:
                windows[passage].append(ids)
        for passage_windows in windows:
            if len(passage_windows) > 1 and text.long_passages == "cut":
                pending.append((passage_windows[0], "cut"))
            elif passage_windows:
                handled = "split" if len(passage_windows) > 1 else "whole"
                pending += [(ids, handled if i == 0 else None) for i, ids in enumerate(passage_windows)]
        while len(pending) >= text.batch_size:
            batch, pending = run(pending[: text.batch_size]), pending[text.batch_size :]
            yield batch
            if stats.tokens >= text.max_tokens:
                return
    if pending:
        yield run(pending)
    if stats.tokens == 0:
        raise InputError("the text is empty: no tokens to run")


def forward(checkpoint: Checkpoint, batch: Batch, packed: bool = False):
    """The model's output over the batch. packed: run its inputs packed end to end into rows where
    the family can (ann_mlp.packing); the output is then only last_hidden_state, in the batch's
    padded shape, equal to the padded pass's up to rounding (the order of summation changes)."""
    with torch.inference_mode():
        packing = pack(checkpoint.adapter, batch.input_ids, batch.mask) if packed else None
        if packing is not None:
            return packing.forward(checkpoint.model)
        return checkpoint.model(**batch.inputs)


def forward_capturing(checkpoint: Checkpoint, batch: Batch, layers: Iterable[int]):
    """One forward pass; returns (model output, {layer: MLP inputs of real tokens (n_tokens, d_model)})."""
    captured: dict[int, torch.Tensor] = {}
    token_mask = batch.mask.reshape(-1)  # (B*T,)
    handles = [_capture_mlp_input(checkpoint, layer, token_mask, captured) for layer in layers]
    try:
        output = forward(checkpoint, batch)
    finally:
        for handle in handles:
            handle.remove()
    return output, captured


def _capture_mlp_input(checkpoint: Checkpoint, layer: int, token_mask: torch.Tensor, captured: dict):
    """Hook the layer's MLP to put its input's real tokens, (n_tokens, d_model) float32, in captured[layer]."""
    module = checkpoint.model.get_submodule(checkpoint.adapter.mlp_input_path(layer))

    def hook(_module, args) -> None:
        x = args[0]
        captured[layer] = x.reshape(-1, x.shape[-1])[token_mask].float().clone()

    return module.register_forward_pre_hook(hook)


class _FirstBlockReached(Exception):
    """Ends a forward pass once the first transformer block's inputs are captured."""


class LayerByLayer:
    """Each layer's MLP inputs over a fixed list of batches, one layer at a time, in order.

    Where the family's blocks run one after another on a hidden state (adapter.blocks_path),
    one block runs over every batch at a time, and only each batch's hidden state is kept
    between blocks: memory holds one layer's MLP inputs, not every layer's (16K tokens of a
    1B LLaMA's 22 layers are 2.9 GB in float32), and a block's weights are read only while
    it runs. The inputs equal a whole forward pass's bit for bit: each block gets the very
    arguments the model's forward gives the first one (masks, positions, rotary tables).
    Elsewhere (T5) one forward pass per batch captures every layer at once.
    """

    def __init__(self, checkpoint: Checkpoint, batches: list[Batch]) -> None:
        self.checkpoint = checkpoint
        self.layer = 0  # the next layer to run
        self.token_masks = [batch.mask.reshape(-1) for batch in batches]  # (B*T,) each
        path = checkpoint.adapter.blocks_path
        self.blocks = None if path is None else checkpoint.model.get_submodule(path)
        if self.blocks is None:
            layers = range(checkpoint.num_layers)
            self.captured = [forward_capturing(checkpoint, batch, layers)[1] for batch in batches]
        else:
            # Per batch: [hidden state (B, T, d_model), the first block's other arguments, its keywords].
            self.block_inputs = [self._first_block_inputs(batch) for batch in batches]

    def _first_block_inputs(self, batch: Batch) -> list:
        found: dict = {}

        def hook(_module, args, kwargs):
            found.update(args=args, kwargs=dict(kwargs))
            raise _FirstBlockReached

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                self.checkpoint.model(**batch.inputs, use_cache=False)
        except _FirstBlockReached:
            pass
        finally:
            handle.remove()
        args, kwargs = found["args"], found["kwargs"]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        return [hidden, args[1:], kwargs]

    def next_layer(self) -> list[torch.Tensor]:
        """The next layer's MLP inputs of real tokens, per batch: (n_tokens, d_model) float32 each."""
        layer, self.layer = self.layer, self.layer + 1
        if self.blocks is None:
            return [captured.pop(layer) for captured in self.captured]
        block, inputs = self.blocks[layer], []
        for state, token_mask in zip(self.block_inputs, self.token_masks):
            captured: dict[int, torch.Tensor] = {}
            handle = _capture_mlp_input(self.checkpoint, layer, token_mask, captured)
            try:
                with torch.inference_mode():
                    output = block(state[0], *state[1], **state[2])
            finally:
                handle.remove()
            state[0] = output[0] if isinstance(output, tuple) else output  # (B, T, d_model)
            inputs.append(captured[layer])
        return inputs

    def release(self, layer: int) -> None:
        """Give back the pages of a finished layer's block still mapped from the weight files."""
        if self.blocks is not None:
            block = self.blocks[layer]
            release_mapped_weights([*block.parameters(), *block.buffers()])
