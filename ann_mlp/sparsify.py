"""`ann-mlp sparsify`: give a dense-activation checkpoint a sparse MLP activation, then distil.

The student is the original model with a new activation in every MLP (for
gated MLPs: on the gate, as ReLU-fied SwiGLU and TurboSparse do):
- `topk`: the model's own activation on the k largest pre-activations per token
  (the Top-k Transformer of Li et al. 2022), so at most k neurons fire;
- `relu`: ReLU (Mirzadeh et al. 2023, "ReLU Strikes Back");
- `fatrelu`: ReLU that also zeroes pre-activations at or below a threshold (ProSparse).
It is trained to reproduce the original model (the teacher) on real text:
hidden-state MSE at every layer plus, for encoders, 1 - cosine of the
mean-pooled embeddings and, for language models, the KL divergence of the
next-token distributions; optionally an L1 push on the activations.

Training state lives in `<out>.partial/` (safetensors + JSON), so a run resumes
where it stopped; the output folder appears only when the run is complete.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ann_mlp.atomic import atomic_folder
from ann_mlp.capture import Batch, batches, make_batch
from ann_mlp.checkpoint import (
    Checkpoint,
    install_activations,
    load_checkpoint,
    resolve_checkpoint,
)
from ann_mlp.config import SparsifyConfig, TextConfig
from ann_mlp.errors import InputError
from ann_mlp.evaluate import OutputAgreement
from ann_mlp.linalg import mean_pool
from ann_mlp.text import (
    HELD_OUT_SOURCE,
    available_sources,
    default_mix,
    describe,
    describe_mix,
    mixed_passages,
)
from ann_mlp.training_state import load_state, save_state

log = logging.getLogger(__name__)

REPORT_FILE = "sparsify_report.json"
LOG_FILE = "sparsify_log.jsonl"
# Training draws its batches from this many passages, taken in turn from each source.
MAX_TRAINING_PASSAGES = 60_000


@dataclass
class SparsifyReport:
    original: str
    method: str
    k: int | None
    threshold: float | None
    steps: int
    tokens_seen: int
    train_seconds: float
    train_text: list[str]
    report_text: str  # the training kinds' evaluation split: in-domain, never trained on
    against_original: dict[str, float]  # the sparsified model, exact MLPs, vs the original, in-domain
    nonzero_pct: list[float]  # per layer, sparsified model, in-domain
    original_positive_pct: list[float]  # per layer, original model: positive pre-activations, in-domain
    held_out_text: str | None  # a kind of text left out of training
    held_out_against_original: dict[str, float] | None
    held_out_nonzero_pct: list[float] | None
    config: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def state_dir_for(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _student_activation(checkpoint: Checkpoint, config: SparsifyConfig) -> tuple[str, int | None, float | None]:
    """(activation name, top-k, threshold) the student's MLPs will compute."""
    w = checkpoint.adapter.mlp_weights(0)
    if config.method == "topk":
        k = config.k if config.k is not None else max(1, w.d_ff // 16)
        if not 1 <= k <= w.d_ff:
            raise InputError(f"k must be in [1, d_ff={w.d_ff}], got {k}")
        return w.activation, k, None
    if config.method == "relu":
        return "relu", None, None
    return "relu", None, config.threshold


def _activation_outputs(checkpoint: Checkpoint) -> tuple[dict[int, torch.Tensor], list]:
    """Forward hooks keeping each layer's activation output (for the L1 term and sparsity)."""
    outputs: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(checkpoint.num_layers):
        module = checkpoint.model.get_submodule(checkpoint.adapter.activation_path(layer))

        def hook(_module, _args, output, layer=layer):
            outputs[layer] = output

        handles.append(module.register_forward_hook(hook))
    return outputs, handles


def _hidden_states(output) -> tuple[torch.Tensor, ...]:
    if getattr(output, "hidden_states", None) is not None:
        return output.hidden_states
    return tuple(output.encoder_hidden_states or ()) + tuple(output.decoder_hidden_states or ())


def distillation_loss(kind: str, batch: Batch, teacher_out, student_out) -> torch.Tensor:
    """Hidden-state MSE at every layer (scaled by the teacher's variance) + the output term."""
    mask = batch.mask  # (B, T)
    terms = []
    for t, s in zip(_hidden_states(teacher_out)[1:], _hidden_states(student_out)[1:]):
        if t.shape[:2] != mask.shape:
            continue  # T5 decoder states when the decoder length differs: the KL covers them
        t, s = t[mask], s[mask]  # (n_tokens, d_model)
        terms.append(F.mse_loss(s, t) / t.var().clamp_min(1e-6))
    hidden = torch.stack(terms).mean() if terms else torch.zeros(())
    if kind == "encoder":
        pooled_t = mean_pool(teacher_out.last_hidden_state, mask)  # (B, d_model)
        pooled_s = mean_pool(student_out.last_hidden_state, mask)
        return hidden + (1 - F.cosine_similarity(pooled_s, pooled_t, dim=1)).mean()
    valid = mask[:, :-1] & mask[:, 1:] if kind == "causal_lm" else mask
    logits_t = (teacher_out.logits[:, :-1] if kind == "causal_lm" else teacher_out.logits)[valid]  # (n, vocab)
    logits_s = (student_out.logits[:, :-1] if kind == "causal_lm" else student_out.logits)[valid]
    kl = F.kl_div(F.log_softmax(logits_s, -1), F.log_softmax(logits_t, -1), log_target=True, reduction="batchmean")
    return hidden + kl


def _lr(step: int, progress: float, config: SparsifyConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth over the budget used so far."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _training_passages(text: list[str | Path], fmt: TextConfig) -> list[str]:
    # Balanced: the training draws each kind alike, however much more text one source has.
    mixed = mixed_passages(text, "calibration", fmt, split_files=True, balanced=True)
    return list(islice(mixed, MAX_TRAINING_PASSAGES))


def held_out_kind(text: list[str | Path], given: str | Path | None) -> str | Path | None:
    """The kind of text the report holds out: the one given, else `licenses` when this machine has
    it and training did not use it."""
    if given is not None:
        return given
    trained = [str(source) for source in text] or default_mix()
    if HELD_OUT_SOURCE not in trained and available_sources([HELD_OUT_SOURCE], "evaluation"):
        return HELD_OUT_SOURCE
    return None


def sparsify(
    spec: str,
    out: Path,
    config: SparsifyConfig,
    text: list[str | Path] | None = None,
    held_out_text: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> SparsifyReport:
    """Train (or resume) the sparse student, write it to `out` with its report, return the report.

    `text`: named sources, files or folders, mixed in turn [the default mix]; training takes their
    calibration split (files: three passages in four), the report their evaluation split and,
    beside it, `held_out_text`, a kind of text left out of training."""
    out = Path(out)
    state_dir = state_dir_for(out)
    if out.exists() and not (resume or force):
        raise InputError(f"{out} exists; pass --resume to continue its run or --force to start over")
    if resume and not (state_dir / "meta.json").is_file():
        raise InputError(f"nothing to resume: {state_dir} holds no training state")
    text = list(text or [])
    held_out = held_out_kind(text, held_out_text)
    # Fail now, not after the training: a source without text, or too little to hold a quarter out.
    if next(mixed_passages(text, "evaluation", config.report_text, split_files=True), None) is None:
        raise InputError("the training text is too short to hold out passages for the report")
    if held_out is not None:
        next(mixed_passages([held_out], "evaluation", config.report_text), None)
    source = resolve_checkpoint(spec)
    teacher = load_checkpoint(source)
    train_passages = _training_passages(text, config.text)
    train_names = [describe(kind, "calibration", config.text) for kind in text or default_mix()]
    activation, topk, threshold = _student_activation(teacher, config)
    student = load_checkpoint(source)
    student.adapter.set_activation(activation, topk, threshold)
    install_activations(student.adapter)
    if force and not resume:
        shutil.rmtree(state_dir, ignore_errors=True)

    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(student.model.parameters(), lr=config.lr, weight_decay=0.0)
    meta: dict[str, Any] = {
        "step": 0,
        "tokens_seen": 0,
        "train_seconds": 0.0,
        "original": spec,
        "config": asdict(config),
        "train_text": train_names,
        "log": [],
    }
    if resume:
        saved = load_state(state_dir, student.model, optimizer)
        if saved["config"]["method"] != config.method:
            raise InputError(f"{state_dir} is a {saved['config']['method']!r} run, not {config.method!r}")
        meta.update({key: saved[key] for key in ("step", "tokens_seen", "train_seconds", "log")})
        log.info("resumed at step %d (%.2f h trained)", meta["step"], meta["train_seconds"] / 3600)

    _train(teacher, student, optimizer, train_passages, config, meta, state_dir, progress)
    report = _report(teacher, student, config, meta, text, held_out, progress)
    _write(student, out, config, report, meta["log"])
    return report


def _budget_used(meta: dict, config: SparsifyConfig) -> float:
    used = []
    if config.minutes is not None:
        used.append(meta["train_seconds"] / (config.minutes * 60))
    if config.steps is not None:
        used.append(meta["step"] / config.steps)
    return max(used)


def _real_tokens(activation: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d_ff) or (B*T, d_ff) activation outputs -> (n_real_tokens, d_ff), padding dropped."""
    return activation.reshape(-1, activation.shape[-1])[mask.reshape(-1)]


def _nonzero_pct(activations: dict[int, torch.Tensor], mask: torch.Tensor) -> list[float]:
    """Per layer, % of non-zero activations over real tokens."""
    return [
        round(float((_real_tokens(a.detach(), mask) != 0).float().mean()) * 100, 2)
        for _, a in sorted(activations.items())
    ]


def _train(
    teacher: Checkpoint,
    student: Checkpoint,
    optimizer: torch.optim.Optimizer,
    train_passages: list[str],
    config: SparsifyConfig,
    meta: dict,
    state_dir: Path,
    progress: bool,
) -> None:
    model = student.model
    # Dropout stays off: the student learns to match the teacher's deterministic outputs, and
    # dropout noise would swamp the small differences distillation has to remove.
    model.eval()
    activations, handles = _activation_outputs(student)
    bar = tqdm(desc="sparsify", unit="step", disable=not progress, initial=meta["step"], total=config.steps)
    try:
        while _budget_used(meta, config) < 1.0:
            start = time.perf_counter()
            step = meta["step"]
            # One stream per step: a resumed run draws exactly the batches an uninterrupted one would.
            rng = random.Random(config.seed * 1_000_003 + step)
            texts = rng.sample(train_passages, min(config.text.batch_size, len(train_passages)))
            batch = make_batch(teacher, texts, config.text.max_seq_len)
            for group in optimizer.param_groups:
                group["lr"] = _lr(step, _budget_used(meta, config), config)
            with torch.no_grad():
                teacher_out = teacher.model(**batch.inputs, output_hidden_states=True)
            student_out = model(**batch.inputs, output_hidden_states=True)
            loss = distillation_loss(teacher.kind, batch, teacher_out, student_out)
            if config.l1 > 0:
                l1 = torch.stack([_real_tokens(a, batch.mask).abs().mean() for a in activations.values()]).sum()
                loss = loss + config.l1 * l1
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            meta["step"] = step + 1
            meta["tokens_seen"] += batch.num_tokens
            meta["train_seconds"] += time.perf_counter() - start
            nonzero = _nonzero_pct(activations, batch.mask)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", nonzero="/".join(f"{v:.1f}" for v in nonzero))
            if meta["step"] % config.save_every == 0 or _budget_used(meta, config) >= 1.0:
                # The log is part of the state, so it never runs ahead of what a resume restores.
                meta["log"].append(
                    {
                        "step": meta["step"],
                        "tokens_seen": meta["tokens_seen"],
                        "train_hours": round(meta["train_seconds"] / 3600, 4),
                        "loss": round(loss.item(), 5),
                        "nonzero_pct": nonzero,
                    }
                )
                save_state(state_dir, model, optimizer, meta)
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


def _compare(
    teacher: Checkpoint, student: Checkpoint, texts: Iterator[str], fmt: TextConfig, progress: bool
) -> tuple[dict[str, float], list[float], list[float]]:
    """The student (exact MLPs) against the teacher on `texts`: output agreement, and per layer the
    student's non-zero share and the teacher's positive share (% of real tokens' activations)."""
    agreement = OutputAgreement(teacher.kind)
    student_acts, student_hooks = _activation_outputs(student)
    teacher_acts, teacher_hooks = _activation_outputs(teacher)
    fired = torch.zeros(student.num_layers)
    positive = torch.zeros(teacher.num_layers)
    tokens = 0
    try:
        with torch.inference_mode():
            for batch in tqdm(batches(teacher, texts, fmt), desc="report batches", disable=not progress):
                agreement.add(batch, teacher.model(**batch.inputs), student.model(**batch.inputs))
                for layer in range(student.num_layers):
                    fired[layer] += (_real_tokens(student_acts[layer], batch.mask) != 0).float().mean(1).sum()
                    positive[layer] += (_real_tokens(teacher_acts[layer], batch.mask) > 0).float().mean(1).sum()
                tokens += int(batch.mask.sum())
    finally:
        for handle in student_hooks + teacher_hooks:
            handle.remove()
    share = [round(float(x) / max(tokens, 1) * 100, 3) for x in fired]
    return agreement.report(), share, [round(float(x) / max(tokens, 1) * 100, 3) for x in positive]


def _report(
    teacher: Checkpoint,
    student: Checkpoint,
    config: SparsifyConfig,
    meta: dict,
    text: list[str | Path],
    held_out: str | Path | None,
    progress: bool,
) -> SparsifyReport:
    """The sparsified model (exact MLPs) against the original, in-domain and on the held-out kind."""
    fmt = config.report_text
    in_domain = mixed_passages(text, "evaluation", fmt, split_files=True)
    against, nonzero, positive = _compare(teacher, student, in_domain, fmt, progress)
    held_against = held_nonzero = None
    if held_out is not None:
        held_passages = mixed_passages([held_out], "evaluation", fmt)
        held_against, held_nonzero, _ = _compare(teacher, student, held_passages, fmt, progress)
    adapter = student.adapter
    return SparsifyReport(
        original=meta["original"],
        method=config.method,
        k=adapter.topk,
        threshold=adapter.threshold,
        steps=meta["step"],
        tokens_seen=meta["tokens_seen"],
        train_seconds=round(meta["train_seconds"], 1),
        train_text=meta["train_text"],
        report_text=describe_mix(text, "evaluation", fmt),
        against_original=against,
        nonzero_pct=nonzero,
        original_positive_pct=positive,
        held_out_text=describe(held_out, "evaluation", fmt) if held_out is not None else None,
        held_out_against_original=held_against,
        held_out_nonzero_pct=held_nonzero,
        config=asdict(config),
    )


def _write(student: Checkpoint, out: Path, config: SparsifyConfig, report: SparsifyReport, log: list[dict]) -> None:
    """The Hugging Face folder, written aside and renamed into place: never half-written."""
    if student.source.gguf_file:
        # GGUF weights were de-quantized to float when loaded; what is saved is a plain float model.
        student.model.hf_quantizer = None
        student.model.config.__dict__.pop("quantization_config", None)
    with atomic_folder(out) as tmp:
        student.model.to(getattr(torch, config.dtype)).save_pretrained(tmp)
        student.model.to(torch.float32)  # back for any further use; .float() refuses GGUF-loaded models
        student.tokenizer.save_pretrained(tmp)
        (tmp / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2) + "\n")
        (tmp / LOG_FILE).write_text("".join(json.dumps(record) + "\n" for record in log))


def report_table(report: SparsifyReport) -> str:
    rows = [
        f"{report.original} -> {report.method}"
        + (f" k={report.k}" if report.k else "")
        + (f" threshold={report.threshold}" if report.threshold else "")
        + f": {report.steps} steps, {report.tokens_seen} tokens, {report.train_seconds / 3600:.2f} h",
        f"trained on {' + '.join(report.train_text)}",
    ]
    compared = [("in-domain", report.report_text, report.against_original)]
    if report.held_out_text is not None:
        compared.append(("held out", report.held_out_text, report.held_out_against_original))
    for label, text, against in compared:
        rows.append(f"against the original, {label} ({text}):")
        rows += [f"  {name:<24} {value:.4f}" for name, value in against.items()]
    held = report.held_out_nonzero_pct or [float("nan")] * len(report.nonzero_pct)
    rows.append(f"{'layer':>5} {'% non-zero':>11} {'held out':>9} {'original % positive':>20}")
    rows += [
        f"{layer:>5} {nz:>11.2f} {h:>9.2f} {orig:>20.2f}"
        for layer, (nz, h, orig) in enumerate(zip(report.nonzero_pct, held, report.original_positive_pct))
    ]
    return "\n".join(rows)
