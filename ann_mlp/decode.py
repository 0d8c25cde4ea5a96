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
    if not prompts or any(not ids for ids in prompts):
        raise InputError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    input_ids, mask = left_padded(prompts, pad_token_id)  # (B, T), (B, T) or None
    batch = len(prompts)
    # Padded rows count their positions from their first real token.
    positions = None if mask is None else (mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    cache = DynamicCache(config=model.config)
    results = [Continuation() for _ in prompts]
    running = torch.ones(batch, dtype=torch.bool)  # (B,)
    with torch.inference_mode():
        for step in range(max_new_tokens):
            reason = None if stop is None else stop()
            if reason is not None:
                raise DeadlineError(f"{reason} after {step} of {max_new_tokens} new tokens")
            output = model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            if on_step is not None:
                on_step()
            logits = output.logits[:, -1].float()  # (B, V)
            chosen = next_tokens(logits, sampling, generator)  # (B,)
            logprobs = torch.log_softmax(logits, dim=-1) if keep_logprobs else None  # (B, V)
            for row in running.nonzero().flatten().tolist():
                token = int(chosen[row])
                if token == eos_token_id:
                    results[row].finish_reason = "stop"
                    running[row] = False
                    continue
                results[row].tokens.append(token)
                if logprobs is not None:
                    results[row].logprobs.append(logprobs[row])
            if not running.any():
                break
            input_ids = torch.where(running, chosen, pad_token_id)[:, None]  # (B, 1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)  # (B, T + step + 1)
                positions = positions[:, -1:] + 1  # (B, 1)
    return results
