"""Autoregressive decoding with a KV cache: the loop `/v1/completions` and `bench decode` run.

A plain loop of model forward calls rather than `generate()`: one new token per sequence per
step, the logits of the last position only, no attention mask while no sequence is padded (so
attention takes the causal fast path), and no logits processors, stopping-criteria objects or
score copies a caller did not ask for. Sequences of unequal length are left-padded and decoded
together; their positions come from the padding mask, so each decodes as it would alone (up to
floating-point summation order). A deadline is checked between steps, so no caller's work
outlives it by more than one step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ann_mlp.errors import DeadlineError, InputError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise InputError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InputError(f"seed must be in [0, 2^63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


GREEDY = Sampling()
# Below this temperature sampling is argmax to float32 precision (a logit gap of 0.01 becomes
# e^-100), and dividing by it could overflow: such temperatures decode greedily.
MIN_TEMPERATURE = 1e-4


@dataclass
class Continuation:
    """One sequence's generated tokens, cut before the end-of-sequence token when it came."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)  # per token, (V,) float32 when kept
    finish_reason: str = "length"  # "length" | "stop"


def pad_token_id(tokenizer) -> int:
    """What fills the padded positions: the tokenizer's pad token, else its end-of-sequence token.
    Padded positions are masked out, so any id serves."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return candidate
    return 0


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids (B, T), attention_mask (B, T) or None when no prompt is padded)."""
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), longest), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, longest - len(ids) :] = 1
    return input_ids, None if bool(mask.all()) else mask


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> (B,) token ids: argmax, or a draw from the tempered top-p distribution."""
    if sampling.greedy:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # (B, V)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p  # (B, V)
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def until(deadline: float) -> Callable[[], str | None]:
    """A `stop` for generate(): "deadline passed" once time.monotonic() is past `deadline`."""
    return lambda: "deadline passed" if time.monotonic() > deadline else None


def generate(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | None,
    pad_token_id: int,
    sampling: Sampling = GREEDY,
    keep_logprobs: bool = False,
    stop: Callable[[], str | None] | None = None,
    on_step: Callable[[], None] | None = None,
) -> list[Continuation]:
    """Decode up to max_new_tokens per prompt, all prompts together, each until its end-of-sequence token.

    stop: asked before every step; a reason it returns (e.g. `until(deadline)`'s) ends decoding with
        DeadlineError, so a caller's work ends within one step of its deadline or of its leaving.
    on_step: called after every forward call (prompt pass included), e.g. to time steps.
    """
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    generator = None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed)
    sequences = [
        Sequence(ids, max_new_tokens, sampling, keep_logprobs, generator, eos_token_id=eos_token_id) for ids in prompts
    ]
    batch = DecodeBatch(model, pad_token_id)
    for step in range(max_new_tokens):
        reason = None if stop is None else stop()
        if reason is not None:
            raise DeadlineError(f"{reason} after {step} of {max_new_tokens} new tokens")
        batch.join(sequences) if step == 0 else batch.step()
        if on_step is not None:
            on_step()
        if not batch.rows:
            break
    return [sequence.continuation for sequence in sequences]


@dataclass(eq=False)
class Sequence:
    """One prompt being continued: its own limits and sampling, and what it has produced."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = GREEDY
    keep_logprobs: bool = False
    # Draws for this sequence; sequences of one request may share one (as a batch drawn together).
    generator: torch.Generator | None = None
    eos_token_id: int | None = None
    # Texts that end the sequence once its decoded continuation contains one (the caller cuts the
    # text there), with the tokens -> text function to look with; no stops: none is decoded.
    stops: tuple[str, ...] = ()
    text_of: Callable[[list[int]], str] | None = None
    continuation: Continuation = field(default_factory=Continuation)
    done: bool = False

    def take(self, token: int, logprobs: torch.Tensor | None) -> None:
        """Record the token chosen at one step; the sequence is done at its end token, a stop
        text or its length."""
        if token == self.eos_token_id:
            self.continuation.finish_reason = "stop"
            self.done = True
            return
        self.continuation.tokens.append(token)
        if self.keep_logprobs:
            self.continuation.logprobs.append(logprobs)
        if self.stops and self.text_of is not None:
            text = self.text_of(self.continuation.tokens)
            if any(stop in text for stop in self.stops):
                self.continuation.finish_reason = "stop"
                self.done = True
                return
        self.done = len(self.continuation.tokens) >= self.max_new_tokens


class DecodeBatch:
    """Sequences decoded together, one new token each per step, joining and leaving between steps.

    Every row of the shared KV cache is left-padded to one length; the attention mask hides the
    padding, and each row's positions count its own tokens only, so a row decodes as it would
    alone (up to floating-point summation order, which a batch's shapes change). A joining group
    runs its prompt pass alone (left-padded among itself), then its cache rows are padded to the
    batch's length and appended; a finished row is dropped, and columns no row needs are cut.
    The model runs in whatever mode surrounds the calls (exact, approximate, planned).
    """

    def __init__(self, model: nn.Module, pad_token_id: int) -> None:
        if getattr(model.config, "is_encoder_decoder", False):
            raise InputError("step-level decoding needs a decoder-only model")
        self.model = model
        self.pad_token_id = pad_token_id
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # (B, L) long: 1 where the cache holds a real token
        self.last_tokens: torch.Tensor | None = None  # (B,) each row's newest token, the next step's input
        self.positions: torch.Tensor | None = None  # (B,) each row's next position

    @property
    def mergeable(self) -> bool:
        """Whether rows can join a running batch: every cache layer must be a plain growing one
        (a sliding-window layer keeps its own length)."""
        return self.cache is None or all(type(layer) is DynamicLayer for layer in self.cache.layers)

    def join(self, sequences: list[Sequence]) -> list[Sequence]:
        """Run the newcomers' prompt pass and choose their first tokens; those not done join the
        batch. Returns the sequences done at once (end token, or one new token wanted)."""
        if not sequences or any(not s.prompt for s in sequences):
            raise InputError("every prompt needs at least one token")
        if self.rows and not self.mergeable:
            raise InputError("this model's cache cannot take rows while others decode")
        input_ids, mask = left_padded([s.prompt for s in sequences], self.pad_token_id)  # (b, T), (b, T) | None
        # Padded rows count their positions from their first real token.
        positions = None if mask is None else (mask.cumsum(1) - 1).clamp(min=0)  # (b, T)
        cache = DynamicCache(config=self.model.config)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        chosen = self._choose(output.logits[:, -1], sequences)  # (b,)
        lengths = torch.tensor([len(s.prompt) for s in sequences])  # (b,)
        new_mask = torch.ones_like(input_ids) if mask is None else mask  # (b, T)
        self._append(sequences, cache, new_mask, chosen, lengths)
        return self._drop_done()

    def step(self) -> list[Sequence]:
        """One new token for every row; returns the sequences that finished."""
        if not self.rows:
            return []
        batch = len(self.rows)
        self.mask = torch.cat([self.mask, torch.ones(batch, 1, dtype=self.mask.dtype)], dim=1)  # (B, L + 1)
        padded = not bool(self.mask.all())
        with torch.inference_mode():
            output = self.model(
                input_ids=self.last_tokens[:, None],  # (B, 1)
                # No mask and no positions while nothing is padded: attention takes its causal fast path.
                attention_mask=self.mask if padded else None,
                position_ids=self.positions[:, None] if padded else None,  # (B, 1)
                cache=self.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        self.positions = self.positions + 1
        self.last_tokens = self._choose(output.logits[:, -1], self.rows)  # (B,)
        return self._drop_done()

    def leave(self, sequences: list[Sequence]) -> None:
        """Drop rows whose caller no longer wants them (deadline, disconnect)."""
        for sequence in sequences:
            sequence.done = True
        self._drop_done()

    def _choose(self, logits: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """logits (B, V) -> (B,) chosen tokens, each row by its own sampling, recorded on its sequence."""
        logits = logits.float()  # (B, V)
        chosen = logits.argmax(-1)  # (B,) greedy rows keep this
        groups: dict[tuple, list[int]] = {}
        for row, sequence in enumerate(sequences):
            if not sequence.sampling.greedy:
                groups.setdefault((sequence.sampling, id(sequence.generator)), []).append(row)
        for rows in groups.values():  # rows sharing sampling and generator draw together, as one batch
            first = sequences[rows[0]]
            chosen[rows] = next_tokens(logits[rows], first.sampling, first.generator)
        keep = any(s.keep_logprobs for s in sequences)
        logprobs = torch.log_softmax(logits, dim=-1) if keep else None  # (B, V)
        for row, sequence in enumerate(sequences):
            sequence.take(int(chosen[row]), None if logprobs is None else logprobs[row])
        return chosen

    def _append(
        self,
        sequences: list[Sequence],
        cache: DynamicCache,
        mask: torch.Tensor,
        chosen: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Add rows: their cache and mask (b, T) left-padded to the batch's length (or the batch's to theirs)."""
        if not self.rows:
            self.rows, self.cache, self.mask = list(sequences), cache, mask
            self.last_tokens, self.positions = chosen, positions
            return
        length = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, length), _left_pad(new.keys, length)])  # (B + b, H, L, D)
            old.values = torch.cat([_left_pad(old.values, length), _left_pad(new.values, length)])
        self.mask = torch.cat([_left_pad(self.mask, length), _left_pad(mask, length)])  # (B + b, L)
        self.rows += sequences
        self.last_tokens = torch.cat([self.last_tokens, chosen])
        self.positions = torch.cat([self.positions, positions])

    def _drop_done(self) -> list[Sequence]:
        done = [s for s in self.rows if s.done]
        if not done:
            return done
        keep = torch.tensor([row for row, s in enumerate(self.rows) if not s.done], dtype=torch.long)
        self.rows = [s for s in self.rows if not s.done]
        if not self.rows:
            self.cache = self.mask = self.last_tokens = self.positions = None
            return done
        self.cache.batch_select_indices(keep)
        # Columns that only the dropped rows used are padding for every row left: cut them.
        first = int(self.mask[keep].any(0).nonzero()[0])
        self.mask = self.mask[keep, first:]  # (B', L')
        if first:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self.last_tokens, self.positions = self.last_tokens[keep], self.positions[keep]
        return done


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Zeros before the sequence axis' start: (B, L) or (B, H, L, D) -> length L' >= L.
    The sequence axis is -1 for a mask, -2 for cached keys and values."""
    axis = -1 if tensor.dim() == 2 else -2
    missing = length - tensor.shape[axis]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[axis] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
