"""`ann-mlp eval`: exact vs approximate model on real text, per layer and end to end.

Per-layer metrics are measured on the exact model's MLP inputs, so each layer
is judged on its own; end-to-end metrics run the fully approximate model,
where errors compound through the layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ann_mlp.approx_mlp import ApproxMLP, dense_activations
from ann_mlp.approx_model import ApproxModel
from ann_mlp.capture import Batch, TextStats, batches, forward, forward_capturing
from ann_mlp.checkpoint import Checkpoint
from ann_mlp.config import EvalConfig
from ann_mlp.errors import InputError
from ann_mlp.linalg import mean_pool
from ann_mlp.metrics import (
    cosine,
    kl_divergence,
    mass_recall,
    nearest_neighbour_agreement,
    recall_at_k,
    relative_errors,
    token_nll,
)
from ann_mlp.text import describe, passages


@dataclass
class LayerReport:
    layer: int
    d_ff: int
    k: int
    gated: bool
    # recall@k against the ranking the index searches: the key scores (the gate's, for gated
    # MLPs); contribution_recall_at_k against the k largest |activations| (|act(gate)·up|), the
    # neurons whose value rows matter most. The two differ only for gated MLPs.
    recall_at_k: float
    contribution_recall_at_k: float
    mass_recall: float
    scanned_fraction: float
    bytes_read_fraction: float
    rel_output_error: float
    search_params: dict[str, Any]


@dataclass
class Report:
    model: str
    backend: str
    k: int
    text: dict[str, Any]  # {"source": name and how it was read, **capture.TextStats.to_json()}
    layers: list[LayerReport]
    end_to_end: dict[str, float]
    family: str = ""
    kind: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LayerTotals:
    """Running sums for one layer over all evaluated tokens."""

    def __init__(self) -> None:
        self.tokens = 0
        self.recall = 0.0
        self.contribution_recall = 0.0
        self.mass = 0.0
        self.keys_scored = 0
        self.bytes_read = 0
        self.rel_error = 0.0

    def add(self, mlp: ApproxMLP, x: torch.Tensor) -> None:
        """x (n, d_model): the exact model's inputs to this MLP."""
        scores, activations = dense_activations(mlp.weights, x)  # (n, d_ff) each
        # Error is measured on the neurons' contribution: the output bias is
        # reproduced exactly and would only dilute it.
        exact = activations @ mlp.value_rows.float()  # (n, d_model)
        approx, retrieved, result = mlp.forward_with_selection(x)
        approx = approx.float()
        if mlp.weights.out_bias is not None:
            approx = approx - mlp.weights.out_bias.float()
        self.tokens += len(x)
        self.recall += float(recall_at_k(scores, retrieved, mlp.k).sum())
        self.contribution_recall += float(recall_at_k(activations.abs(), retrieved, mlp.k).sum())
        self.mass += float(mass_recall(activations, retrieved).sum())
        self.keys_scored += result.keys_scored
        self.bytes_read += result.bytes_read
        self.rel_error += float(relative_errors(approx, exact).sum())

    def report(self, layer: int, mlp: ApproxMLP) -> LayerReport:
        n = max(self.tokens, 1)
        return LayerReport(
            layer=layer,
            d_ff=mlp.weights.d_ff,
            k=mlp.k,
            gated=mlp.weights.gated,
            recall_at_k=self.recall / n,
            contribution_recall_at_k=self.contribution_recall / n,
            mass_recall=self.mass / n,
            scanned_fraction=self.keys_scored / (n * mlp.index.num_keys),
            bytes_read_fraction=self.bytes_read / (n * mlp.index.full_scan_bytes),
            rel_output_error=self.rel_error / n,
            search_params=dict(mlp.search_params),
        )


class OutputAgreement:
    """End-to-end agreement of two models' outputs on the same batches (reference vs candidate)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.exact_embeddings: list[torch.Tensor] = []
        self.approx_embeddings: list[torch.Tensor] = []
        self.positions = 0
        self.agree = 0
        self.kl = 0.0
        self.nll_exact = 0.0
        self.nll_approx = 0.0

    def add(self, batch: Batch, exact, approx) -> None:
        if self.kind == "encoder":
            self.exact_embeddings.append(mean_pool(exact.last_hidden_state, batch.mask))  # (B, d_model)
            self.approx_embeddings.append(mean_pool(approx.last_hidden_state, batch.mask))
            return
        if self.kind == "causal_lm":  # position t predicts token t + 1
            valid = batch.mask[:, :-1] & batch.mask[:, 1:]  # (B, T-1)
            exact_logits, approx_logits = exact.logits[:, :-1][valid], approx.logits[:, :-1][valid]
            targets = batch.input_ids[:, 1:][valid]
        else:  # seq2seq, teacher-forced on its own input: position t predicts token t
            valid = batch.mask
            exact_logits, approx_logits = exact.logits[valid], approx.logits[valid]
            targets = batch.input_ids[valid]
        self.positions += len(targets)
        self.agree += int((exact_logits.argmax(-1) == approx_logits.argmax(-1)).sum())
        self.kl += float(kl_divergence(exact_logits, approx_logits).sum())
        self.nll_exact += float(token_nll(exact_logits, targets).sum())
        self.nll_approx += float(token_nll(approx_logits, targets).sum())

    def report(self) -> dict[str, float]:
        if self.kind == "encoder":
            exact = torch.cat(self.exact_embeddings)
            approx = torch.cat(self.approx_embeddings)
            cos = cosine(exact, approx)
            return {
                "embedding_cosine_mean": float(cos.mean()),
                "embedding_cosine_min": float(cos.min()),
                "neighbour_agreement": nearest_neighbour_agreement(exact, approx),
                "sentences": float(len(exact)),
            }
        n = max(self.positions, 1)
        return {
            "next_token_agreement": self.agree / n,
            "kl_mean": self.kl / n,
            "perplexity_exact": float(torch.exp(torch.tensor(self.nll_exact / n))),
            "perplexity_approx": float(torch.exp(torch.tensor(self.nll_approx / n))),
            "positions": float(self.positions),
        }


class Comparison:
    """Exact vs approximate on batches of real inputs, accumulated: per-layer and end-to-end metrics."""

    def __init__(self, model: ApproxModel) -> None:
        self.model = model
        self.layers = sorted(model.mlps)
        self.totals = {layer: LayerTotals() for layer in self.layers}
        self.end_to_end = OutputAgreement(model.checkpoint.kind)
        self.tokens = 0

    def add(self, batch: Batch) -> tuple[Any, Any]:
        """Run the batch both ways; return (exact output, approximate output)."""
        exact, captured = forward_capturing(self.model.checkpoint, batch, self.layers)
        with torch.inference_mode():
            for layer in self.layers:
                self.totals[layer].add(self.model.mlps[layer], captured[layer])
        with self.model.approximate():
            approx = forward(self.model.checkpoint, batch)
        self.end_to_end.add(batch, exact, approx)
        self.tokens += batch.num_tokens
        return exact, approx

    def layer_reports(self) -> list[LayerReport]:
        return [self.totals[layer].report(layer, self.model.mlps[layer]) for layer in self.layers]


def evaluate(
    model: ApproxModel,
    config: EvalConfig,
    text: str | Path | None = None,
    progress: bool = True,
    reference: Checkpoint | None = None,
) -> Report:
    """reference: another checkpoint (e.g. the original a sparsified model came from) that the exact
    and the approximate model are also compared with, end to end: the whole chain in one report.
    The model runs at the config's k, search parameters and candidate factor for this report only."""
    with model.configured(config.k, config.search_params, config.candidate_factor):
        return _evaluate(model, config, text, progress, reference)


def _evaluate(
    model: ApproxModel, config: EvalConfig, text: str | Path | None, progress: bool, reference: Checkpoint | None
) -> Report:
    checkpoint = model.checkpoint
    against: dict[str, OutputAgreement] = {}
    if reference is not None:
        if reference.kind != checkpoint.kind:
            raise InputError(f"the reference is a {reference.kind}, the store's model a {checkpoint.kind}")
        if reference.tokenizer.get_vocab() != checkpoint.tokenizer.get_vocab():
            raise InputError("the reference checkpoint tokenizes differently: outputs cannot be compared")
        against = {
            "exact_vs_reference": OutputAgreement(checkpoint.kind),
            "approx_vs_reference": OutputAgreement(checkpoint.kind),
        }
    comparison = Comparison(model)
    stats = TextStats()
    stream = batches(checkpoint, passages(text, "evaluation", config.text), config.text, stats)
    for batch in tqdm(stream, desc="eval batches", disable=not progress):
        exact, approx = comparison.add(batch)
        if against:
            expected = forward(reference, batch)
            against["exact_vs_reference"].add(batch, expected, exact)
            against["approx_vs_reference"].add(batch, expected, approx)
    manifest = model.manifest
    extra = {"reference": reference.source.spec, **{name: a.report() for name, a in against.items()}} if against else {}
    if config.candidate_factor is not None:
        extra["candidate_factor"] = config.candidate_factor
    if any(mlp.candidates > mlp.k for mlp in model.mlps.values()):
        extra["candidates"] = [mlp.candidates for mlp in model.mlps.values()]
    return Report(
        model=manifest.name,
        backend=manifest.backend,
        k=config.k or manifest.k,
        text={"source": describe(text, "evaluation", config.text), **stats.to_json()},
        layers=comparison.layer_reports(),
        end_to_end=comparison.end_to_end.report(),
        family=manifest.family,
        kind=manifest.kind,
        extra=extra,
    )
