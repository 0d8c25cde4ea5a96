"""`ann-mlp bench decode`: generation, one new token per sequence per step, exact vs approximate.

The regime the method exists for: every MLP call carries B tokens (B sequences decoded
together), where a dense layer must still read all of its weights. Throughput is timed in
turns (exact, approx, auto; the order reversed every other turn) with speedups paired per
turn; fidelity is measured in the same run: how much of the exact model's greedy
continuation the approximate model reproduces, the KL divergence of next-token
distributions along that continuation, and perplexity on the prompts. A separate pass with
hooks splits a decode step's time into index search, the rest of the MLPs, attention and
everything else. With `llama_cpp`, llama.cpp (through llama-cpp-python) decodes the same prompt
tokens from the store's own GGUF file in the same turns: the peer a user would otherwise run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ann_mlp.approx_model import ApproxModel
from ann_mlp.decode import generate, pad_token_id
from ann_mlp.errors import InputError
from ann_mlp.text import describe, passages
from ann_mlp.timing import time_in_turns

MODES = ("exact", "approx", "auto")


@dataclass(frozen=True)
class StepSplit:
    """Milliseconds per decode step (prompt pass excluded), measured with hooks in their own pass."""

    total_ms: float
    index_search_ms: float
    mlp_rest_ms: float  # the MLPs' time outside the index search
    attention_ms: float
    other_ms: float  # embeddings, norms, residuals, logits, the loop itself


@dataclass(frozen=True)
class DecodeBenchResult:
    model: str
    backend: str
    batch: int  # sequences decoded together
    prompts: int
    prompt_tokens: int  # longest prompt
    new_tokens: int  # per sequence
    text: str
    exact_tokens_per_s: float  # generated tokens per second, median over turns
    approx_tokens_per_s: float  # every layer approximated
    auto_tokens_per_s: float  # the store's plan: dense where search does not pay
    generate_tokens_per_s: float  # exact, through transformers' generate(): the reference loop
    approx_speedup: float  # median over turns of exact time / this mode's time in the same turn
    auto_speedup: float
    lean_loop_speedup: float  # generate() time / the lean loop's exact time, paired likewise
    continuation_agreement: float  # approx: share of generated tokens equal to the exact greedy ones
    auto_continuation_agreement: float
    kl_mean: float  # KL(exact || approx) of next-token distributions along the exact continuation
    perplexity_exact: float  # on the prompts
    perplexity_approx: float
    auto_dense_fraction: float  # share of (layer, token) MLP calls the plan ran dense while decoding
    split: dict[str, StepSplit]  # per mode
    turns: int
    # llama.cpp on the store's GGUF file (its own quantized kernels), greedy, the same prompts and
    # new tokens, one sequence at a time; None when not asked for.
    llama_cpp_tokens_per_s: float | None = None
    llama_cpp_vs_exact: float | None = None  # median over turns of exact time / llama.cpp time

    def to_json(self) -> dict:
        return asdict(self)


def prompt_batches(
    model: ApproxModel, text: Path | None, count: int, prompt_tokens: int, new_tokens: int, batch: int
) -> list[list[list[int]]]:
    """`count` prompts of at most `prompt_tokens` tokens, grouped `batch` at a time: paragraphs of the
    text file, or held-out passages of the built-in text."""
    tokenizer = model.checkpoint.tokenizer
    limit = getattr(model.checkpoint.model.config, "max_position_embeddings", None)
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise InputError(f"{prompt_tokens} prompt + {new_tokens} new tokens exceed the model's {limit} positions")
    prompts = []
    for passage in passages(text, "evaluation"):
        ids = tokenizer(passage, add_special_tokens=True)["input_ids"][:prompt_tokens]
        if len(ids) >= 2:
            prompts.append(ids)
        if len(prompts) == count:
            break
    if not prompts:
        raise InputError("the prompt text has no passage of two tokens or more")
    return [prompts[i : i + batch] for i in range(0, len(prompts), batch)]


def _decode_all(model: ApproxModel, groups: list[list[list[int]]], new_tokens: int, mode: str) -> list[list[int]]:
    """Greedy continuations of every prompt, exactly new_tokens each (no end-of-sequence stop)."""
    checkpoint = model.checkpoint

    def run() -> list[list[int]]:
        out = []
        for group in groups:
            out += [
                c.tokens
                for c in generate(
                    checkpoint.model,
                    group,
                    new_tokens,
                    eos_token_id=None,
                    pad_token_id=pad_token_id(checkpoint.tokenizer),
                )
            ]
        return out

    if mode == "exact":
        return run()
    with model.approximate(planned=mode == "auto"):
        return run()


def _generate_reference(model: ApproxModel, groups: list[list[list[int]]], new_tokens: int) -> None:
    """transformers' generate(), exact, greedy, as a server would call it for the same prompts."""
    checkpoint = model.checkpoint
    pad = pad_token_id(checkpoint.tokenizer)
    with torch.inference_mode():
        for group in groups:
            longest = max(map(len, group))
            ids = torch.tensor([[pad] * (longest - len(p)) + p for p in group])  # (B, T) left-padded
            mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in group])
            checkpoint.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
                output_scores=True,
                return_dict_in_generate=True,
            )


def llama_cpp_decoder(model: ApproxModel, groups: list[list[list[int]]], new_tokens: int) -> Callable[[], None]:
    """A call that decodes every prompt greedily with llama.cpp from the store's GGUF file, exactly
    new_tokens each (end-of-sequence ignored), on as many threads as torch uses."""
    source = model.manifest.source
    if not source.get("gguf_file"):
        raise InputError("--llama-cpp compares on the store's GGUF file: build the store from a .gguf checkpoint")
    if any(len(group) > 1 for group in groups):
        raise InputError("--llama-cpp decodes one sequence at a time: use --batch 1")
    try:
        from llama_cpp import Llama
    except ImportError:
        raise InputError("--llama-cpp needs llama-cpp-python: pip install 'ann-mlp[llama-cpp]'") from None
    longest = max(len(prompt) for group in groups for prompt in group)
    llm = Llama(
        model_path=str(Path(source["path"]) / source["gguf_file"]),
        n_ctx=longest + new_tokens + 8,
        n_threads=torch.get_num_threads(),
        n_threads_batch=torch.get_num_threads(),
        verbose=False,
    )

    def run() -> None:
        for (prompt,) in groups:
            llm.reset()  # no prompt reuse from the last turn: every path evaluates its prompts afresh
            for produced, _token in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True), start=1):
                if produced == new_tokens:
                    break

    return run


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of positions where the continuations hold the same token."""
    same = sum(a == b for ref, oth in zip(reference, other) for a, b in zip(ref, oth))
    return same / sum(len(ref) for ref in reference)


def _sequence_logprobs(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V) next-token log-probabilities at every position but the last."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()  # (T - 1, V)
    return torch.log_softmax(logits, dim=-1)


def teacher_forced(model: ApproxModel, prompts: list[list[int]], continuations: list[list[int]]) -> dict[str, float]:
    """KL along the exact continuations and perplexity on the prompts, every layer approximated."""
    kls, nll = [], {"exact": 0.0, "approx": 0.0}
    tokens = 0
    for prompt, continuation in zip(prompts, continuations):
        ids = prompt + continuation
        exact = _sequence_logprobs(model.checkpoint.model, ids)  # (T - 1, V)
        with model.approximate():
            approx = _sequence_logprobs(model.checkpoint.model, ids)
        generated = slice(len(prompt) - 1, len(ids) - 1)  # positions predicting the continuation
        kls += (exact[generated].exp() * (exact[generated] - approx[generated])).sum(-1).tolist()
        targets = torch.tensor(prompt[1:])
        for name, logprobs in (("exact", exact), ("approx", approx)):
            nll[name] -= float(logprobs[: len(prompt) - 1].gather(1, targets[:, None]).sum())
        tokens += len(prompt) - 1
    return {
        "kl_mean": statistics.mean(kls),
        "perplexity_exact": math.exp(nll["exact"] / tokens),
        "perplexity_approx": math.exp(nll["approx"] / tokens),
    }


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The outermost modules whose class names them attention (OPTAttention, LlamaAttention, ...)."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if "Attention" in type(module).__name__:
            found.append(module)
            inside.update(id(m) for m in module.modules())
    return found


@contextmanager
def _timed_regions(model: ApproxModel, seconds: dict[str, float]) -> Iterator[None]:
    """Accumulate the wall time spent in attention modules and in MLPs (as currently patched) into `seconds`."""
    adapter, net = model.checkpoint.adapter, model.checkpoint.model
    handles, started = [], {}

    def region(name: str, start: nn.Module, end: nn.Module, key: int) -> None:
        def begin(*_):
            started[key] = time.perf_counter()

        def finish(*_):
            seconds[name] += time.perf_counter() - started.pop(key)

        handles.append(start.register_forward_pre_hook(begin))
        handles.append(end.register_forward_hook(finish))

    for number, module in enumerate(_attention_modules(net)):
        region("attention", module, module, key=-1 - number)
    for layer in model.mlps:
        target, identities = adapter.replacement(layer)
        first = net.get_submodule(target)
        last = net.get_submodule(identities[-1]) if identities else first
        # A patched layer's identities are one shared stateless module: its MLP ends where the ApproxMLP does.
        region("mlp", first, first if isinstance(last, nn.Identity) else last, key=layer)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def step_split(model: ApproxModel, groups: list[list[list[int]]], new_tokens: int, mode: str) -> StepSplit:
    """One pass of decoding in `mode` with hooks, prompt passes left out of the split."""
    checkpoint = model.checkpoint
    seconds = {"attention": 0.0, "mlp": 0.0}
    kept = {"total": 0.0, "attention": 0.0, "mlp": 0.0, "search": 0.0}
    steps = 0

    def run() -> None:
        nonlocal steps
        for group in groups:
            last = [time.perf_counter()]
            calls = [0]

            def on_step() -> None:
                nonlocal steps
                now = time.perf_counter()
                search = sum(m.stats.search_seconds for m in model.mlps.values())
                if calls[0] > 0:  # a decode step, not the prompt pass
                    kept["total"] += now - last[0]
                    kept["attention"] += seconds["attention"]
                    kept["mlp"] += seconds["mlp"]
                    kept["search"] += search
                    steps += 1
                calls[0] += 1
                seconds["attention"] = seconds["mlp"] = 0.0
                model.reset_stats()
                last[0] = time.perf_counter()

            model.reset_stats()
            seconds["attention"] = seconds["mlp"] = 0.0
            generate(
                checkpoint.model,
                group,
                new_tokens,
                eos_token_id=None,
                pad_token_id=pad_token_id(checkpoint.tokenizer),
                on_step=on_step,
            )

    if mode == "exact":
        with _timed_regions(model, seconds):
            run()
    else:
        with model.approximate(planned=mode == "auto"), _timed_regions(model, seconds):
            run()
    per_step = {name: value / steps * 1e3 for name, value in kept.items()}
    return StepSplit(
        total_ms=round(per_step["total"], 3),
        index_search_ms=round(per_step["search"], 3),
        mlp_rest_ms=round(per_step["mlp"] - per_step["search"], 3),
        attention_ms=round(per_step["attention"], 3),
        other_ms=round(per_step["total"] - per_step["mlp"] - per_step["attention"], 3),
    )


def bench_decode(
    model: ApproxModel,
    text: Path | None = None,
    new_tokens: int = 64,
    batch: int = 1,
    prompts: int = 8,
    prompt_tokens: int = 32,
    turns: int = 4,
    llama_cpp: bool = False,
) -> DecodeBenchResult:
    """Exact, approx and auto decoding of the same prompts (and llama.cpp's, with `llama_cpp`),
    timed in turns after one warm-up turn."""
    if model.checkpoint.kind != "causal_lm":
        raise InputError(f"{model.manifest.name} is a {model.checkpoint.kind}: bench decode needs a causal LM")
    if min(new_tokens, batch, prompts, turns) < 1 or prompt_tokens < 2:
        raise InputError("new tokens, batch, prompts and turns must be positive, prompt tokens at least 2")
    groups = prompt_batches(model, text, prompts, prompt_tokens, new_tokens, batch)
    flat = [p for group in groups for p in group]
    if len(flat) < batch:
        raise InputError(f"{len(flat)} prompts cannot fill a batch of {batch}: give at least --batch prompts")
    continuations = {mode: _decode_all(model, groups, new_tokens, mode) for mode in ("exact", "approx")}
    model.reset_stats()  # the auto pass's counts alone: how much of it the plan ran dense
    continuations["auto"] = _decode_all(model, groups, new_tokens, "auto")
    mlps = model.mlps.values()
    dense = sum(m.stats.dense_tokens for m in mlps)
    dense_fraction = dense / max(1, dense + sum(m.stats.queries for m in mlps))
    calls = {mode: (lambda mode=mode: _decode_all(model, groups, new_tokens, mode)) for mode in MODES}
    calls["generate"] = lambda: _generate_reference(model, groups, new_tokens)
    if llama_cpp:
        calls["llama.cpp"] = llama_cpp_decoder(model, groups, new_tokens)
    times = time_in_turns(calls, turns)
    generated = len(flat) * new_tokens

    def paired(base: str, other: str) -> float:
        return round(statistics.median(b / o for b, o in zip(times[base], times[other])), 4)

    fidelity = teacher_forced(model, flat, continuations["exact"])
    return DecodeBenchResult(
        model=model.manifest.name,
        backend=model.manifest.backend,
        batch=batch,
        prompts=len(flat),
        prompt_tokens=max(map(len, flat)),
        new_tokens=new_tokens,
        text=describe(text, "evaluation"),
        **{
            f"{mode}_tokens_per_s": round(generated / statistics.median(times[mode]), 1)
            for mode in (*MODES, "generate")
        },
        approx_speedup=paired("exact", "approx"),
        auto_speedup=paired("exact", "auto"),
        lean_loop_speedup=paired("generate", "exact"),
        continuation_agreement=round(agreement(continuations["exact"], continuations["approx"]), 4),
        auto_continuation_agreement=round(agreement(continuations["exact"], continuations["auto"]), 4),
        kl_mean=round(fidelity["kl_mean"], 5),
        perplexity_exact=round(fidelity["perplexity_exact"], 3),
        perplexity_approx=round(fidelity["perplexity_approx"], 3),
        auto_dense_fraction=round(dense_fraction, 4),
        split={mode: step_split(model, groups, new_tokens, mode) for mode in MODES},
        turns=turns,
        **(
            {
                "llama_cpp_tokens_per_s": round(generated / statistics.median(times["llama.cpp"]), 1),
                "llama_cpp_vs_exact": paired("exact", "llama.cpp"),
            }
            if llama_cpp
            else {}
        ),
    )
