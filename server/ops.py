"""The work behind each route, as plain functions run on the engine's worker thread."""

from __future__ import annotations

import base64
from contextlib import nullcontext
from dataclasses import asdict
from typing import TypeVar

import torch

from ann_mlp import decode
from ann_mlp.capture import batch_from_ids
from ann_mlp.decode import Sampling
from ann_mlp.errors import DeadlineError
from ann_mlp.linalg import mean_pool
from server.engine import Engine, Knobs, Run, ServedModel
from server.errors import InvalidRequest
from server.schemas import RunInfo
from server.settings import ServerSettings

T = TypeVar("T")


def tokenize(
    served: ServedModel,
    inputs: list[str] | list[list[int]],
    settings: ServerSettings,
    param: str,
    new_tokens: int = 0,
    compare: bool = False,
) -> list[list[int]]:
    """Texts or token ids -> token id lists, checked against the request limits, the model's
    context (each input plus `new_tokens` must fit its positions) and the request's whole work."""
    if not inputs:
        raise InvalidRequest("no inputs given", param=param)
    if len(inputs) > settings.max_inputs:
        raise InvalidRequest(f"{len(inputs)} inputs exceed the limit of {settings.max_inputs}", param=param)
    if isinstance(inputs[0], str):
        if any(not text for text in inputs):
            raise InvalidRequest("inputs must not be empty strings", param=param)
        try:
            ids = served.tokenizer(list(inputs), add_special_tokens=True)["input_ids"]
        except (TypeError, ValueError, UnicodeError) as err:  # e.g. an unpaired surrogate
            raise InvalidRequest(f"a text cannot be tokenized: {err}", param=param) from err
    else:
        ids = [list(x) for x in inputs]
        vocab = len(served.tokenizer)
        if any(not x for x in ids):
            raise InvalidRequest("token id lists must not be empty", param=param)
        if any(t < 0 or t >= vocab for x in ids for t in x):
            raise InvalidRequest(f"token ids must be in [0, {vocab})", param=param)
    longest = max(len(x) for x in ids)
    if longest > settings.max_input_tokens:
        raise InvalidRequest(f"an input has {longest} tokens; the limit is {settings.max_input_tokens}", param=param)
    work = sum(len(x) + new_tokens for x in ids) * (2 if compare else 1)
    if work > settings.max_request_tokens:
        counted = " (compare mode counts twice)" if compare else ""
        raise InvalidRequest(
            f"the request's work of {work} tokens{counted} exceeds the limit of {settings.max_request_tokens}",
            param=param,
        )
    context = served.context
    if context is not None and longest + new_tokens > context:
        asked = f"{longest} tokens" + (f" + {new_tokens} new tokens" if new_tokens else "")
        raise InvalidRequest(f"an input of {asked} exceeds {served.name}'s context of {context} positions", param=param)
    return ids


def checked_token_ids(
    served: ServedModel,
    inputs: list[str] | list[list[int]],
    settings: ServerSettings,
    param: str,
    new_tokens: int = 0,
    compare: bool = False,
) -> list[list[int]] | None:
    """Token id inputs checked at once, on arrival (cheap); None for texts, which the worker tokenizes."""
    if inputs and isinstance(inputs[0], str):
        return None
    return tokenize(served, inputs, settings, param, new_tokens, compare)


def as_list(value) -> list:
    """OpenAI inputs: a string, a list of strings, a token list, or a list of token lists."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]
    return list(value)


def one_or_each(values: list[T]) -> T | list[T]:
    """A per-layer setting as one value when every layer has it, else the list in layer order."""
    return values[0] if all(value == values[0] for value in values) else values


def run_info(served: ServedModel, knobs: Knobs, run: Run) -> RunInfo:
    return RunInfo(
        mode=knobs.mode,
        k=one_or_each(run.k),
        candidates=one_or_each(run.candidates),
        search_params=one_or_each(run.search_params),
        candidate_factor=knobs.candidate_factor,
        scanned_fraction=None if knobs.mode == "exact" else run.scanned_fraction,
        dense_fraction=run.dense_fraction if knobs.mode == "auto" else None,
        timing=asdict(run.timing),
        batch_size=run.batch_size,
        report=run.report,
    )


def pooled_embeddings(run: Run) -> torch.Tensor:
    """Mean over real tokens, L2-normalised: what sentence-transformers returns for MiniLM."""
    pooled = mean_pool(run.output.last_hidden_state, run.batch.mask)  # (B, d_model)
    return torch.nn.functional.normalize(pooled, dim=-1)


def encode_embedding(vector: torch.Tensor, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai client asks for by default
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def last_position_logprobs(run: Run) -> torch.Tensor:
    """(B, V) log-probabilities of the next token after each input's last real token."""
    last = run.batch.mask.sum(1) - 1  # (B,)
    logits = run.output.logits[torch.arange(len(last)), last]  # (B, V)
    return torch.log_softmax(logits.float(), dim=-1)


def top_alternatives(served: ServedModel, logprobs: torch.Tensor, count: int) -> list[dict]:
    values, ids = logprobs.topk(count)
    return [
        {"token_id": int(i), "token": served.tokenizer.decode([int(i)]), "logprob": float(v)}
        for v, i in zip(values, ids)
    ]


def sequences(served: ServedModel, prompts: list[list[int]], request) -> list[decode.Sequence]:
    """A completion request's prompts as sequences to decode, each with the request's limits,
    stop texts and sampling, and its own generator when seeded (each decodes as it would alone)."""
    sampling = Sampling(temperature=request.temperature or 0.0, top_p=request.top_p or 1.0, seed=request.seed)
    tokenizer = served.tokenizer
    return [
        decode.Sequence(
            ids,
            request.max_tokens,
            sampling,
            keep_logprobs=request.logprobs is not None,
            generator=None if sampling.seed is None else torch.Generator().manual_seed(sampling.seed),
            eos_token_id=tokenizer.eos_token_id,
            stops=tuple(stop for stop in stop_texts(request) if stop),
            text_of=lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True),
        )
        for ids in prompts
    ]


def stop_texts(request) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else (request.stop or [])


def generate(engine: Engine, served: ServedModel, sequence: decode.Sequence, knobs: Knobs) -> Run:
    """Decode one sequence alone with the model in the request's mode (exact, compare). Its prompt
    pass gives the answer's timing; compare first runs the prompt through both models, for its
    report. The engine's check before every layer stops the work once the request's deadline has
    passed or its caller has left."""
    checkpoint = served.approx.checkpoint
    compared = (
        engine.run(served, batch_from_ids(checkpoint, [sequence.prompt]), knobs) if knobs.mode == "compare" else None
    )
    batch = decode.DecodeBatch(checkpoint.model, decode.pad_token_id(served.tokenizer))
    exact = knobs.mode == "exact"
    try:
        with engine.configured(served, knobs), nullcontext() if exact else served.approx.approximate():
            run = engine.measured_join(served, batch, [sequence])
            while batch.rows:
                batch.step()
    except DeadlineError as err:
        raise engine.stopped_error(str(err)) from err
    return compared or run


def completion(served: ServedModel, continuation: decode.Continuation, request) -> dict:
    """One choice of a completion: its text cut at the first stop string, finish reason, logprobs."""
    tokenizer = served.tokenizer
    new_ids, finish = continuation.tokens, continuation.finish_reason
    text = tokenizer.decode(new_ids, skip_special_tokens=True)
    for stop in stop_texts(request):
        if stop and stop in text:
            text, finish = text[: text.index(stop)], "stop"
    logprobs = None
    if request.logprobs is not None:
        tokens = [tokenizer.decode([t]) for t in new_ids]
        offsets, position = [], 0
        for token in tokens:
            offsets.append(position)
            position += len(token)
        logprobs = {
            "tokens": tokens,
            "token_logprobs": [float(lp[t]) for lp, t in zip(continuation.logprobs, new_ids)],
            "top_logprobs": [
                {a["token"]: a["logprob"] for a in top_alternatives(served, lp, request.logprobs)}
                for lp in continuation.logprobs
            ]
            if request.logprobs > 0
            else None,
            "text_offset": offsets,
        }
    return {"text": text, "finish_reason": finish, "logprobs": logprobs, "completion_tokens": len(new_ids)}
