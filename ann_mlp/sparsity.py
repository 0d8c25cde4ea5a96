"""`ann-mlp sparsity`: how many MLP neurons fire per token, measured as Li et al. 2022 do.

For ReLU models a neuron "fires" when its activation is non-zero (pre-activation
> 0). For other activations nothing is exactly zero, so the tool counts positive
pre-activations (gated models: of the gate) and labels the figures that way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ann_mlp.activations import activation_module
from ann_mlp.capture import batches, forward_capturing
from ann_mlp.checkpoint import Checkpoint
from ann_mlp.config import TextConfig
from ann_mlp.text import describe, passages

RELU_ACTIVATIONS = {"relu"}
PERCENTILES = (10, 50, 90, 99)
FREQUENCY_POINTS = 200  # the sorted firing-frequency curve, resampled for JSON


@dataclass
class LayerSparsity:
    layer: int
    d_ff: int
    activation: str
    measure: str  # "nonzero_activations" (ReLU) or "positive_preactivations"
    nonzero_pct: float  # mean over tokens of fired neurons / d_ff, in %
    per_token_pct_percentiles: dict[str, float]  # p10, p50, p90, p99 of the per-token %
    dead_neurons: int  # never fired on the text
    firing_frequency_sorted: list[float]  # per-neuron share of tokens it fired on, descending, resampled


@dataclass
class SparsityReport:
    model: str
    family: str
    text: str
    tokens: int
    layers: list[LayerSparsity]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_sparsity(
    checkpoint: Checkpoint, text: Path | None, config: TextConfig, progress: bool = True
) -> SparsityReport:
    layers = range(checkpoint.num_layers)
    weights = [checkpoint.adapter.mlp_weights(layer) for layer in layers]
    fired_per_neuron = [torch.zeros(w.d_ff, dtype=torch.long) for w in weights]
    fired_per_token: list[list[torch.Tensor]] = [[] for _ in layers]
    tokens = 0
    for batch in tqdm(
        batches(checkpoint, passages(text, "evaluation", config), config), desc="sparsity batches", disable=not progress
    ):
        _, captured = forward_capturing(checkpoint, batch, layers)
        for layer, w in zip(layers, weights):
            scores = captured[layer] @ w.keys.float().T  # (n_tokens, d_ff)
            if w.key_bias is not None:
                scores += w.key_bias.float()
            if _exact_zeros(w):  # count what the activation leaves non-zero
                fired = activation_module(w.activation, w.topk, w.threshold)(scores) != 0  # (n_tokens, d_ff)
            else:
                fired = scores > 0  # (n_tokens, d_ff)
            fired_per_neuron[layer] += fired.sum(0)
            fired_per_token[layer].append(fired.sum(1))
        tokens += batch.num_tokens
    reports = []
    for layer, w in zip(layers, weights):
        per_token = torch.cat(fired_per_token[layer]).numpy() / w.d_ff * 100  # (tokens,)
        frequency = np.sort(fired_per_neuron[layer].numpy() / tokens)[::-1]  # (d_ff,), descending
        resampled = np.interp(np.linspace(0, w.d_ff - 1, min(FREQUENCY_POINTS, w.d_ff)), np.arange(w.d_ff), frequency)
        reports.append(
            LayerSparsity(
                layer=layer,
                d_ff=w.d_ff,
                activation=w.activation,
                measure="nonzero_activations" if _exact_zeros(w) else "positive_preactivations",
                nonzero_pct=float(per_token.mean()),
                per_token_pct_percentiles={f"p{p}": float(np.percentile(per_token, p)) for p in PERCENTILES},
                dead_neurons=int((fired_per_neuron[layer] == 0).sum()),
                firing_frequency_sorted=[round(float(v), 6) for v in resampled],
            )
        )
    return SparsityReport(
        model=checkpoint.source.spec,
        family=checkpoint.family,
        text=describe(text, "evaluation", config),
        tokens=tokens,
        layers=reports,
    )


def _exact_zeros(w) -> bool:
    """Whether the activation leaves exact zeros (ReLU family, a Top-k or a threshold)."""
    return w.activation in RELU_ACTIVATIONS or bool(w.topk) or w.threshold is not None


def sparsity_table(report: SparsityReport) -> str:
    measure = report.layers[0].measure
    label = "% non-zero" if measure == "nonzero_activations" else "% positive pre-act."
    rows = [
        f"{report.model} ({report.family}), {report.tokens} tokens of {report.text}; "
        f"{'activations' if measure == 'nonzero_activations' else 'not ReLU: positive pre-activations counted'}",
        f"{'layer':>5} {'d_ff':>6} {label:>20} "
        + " ".join(f"{'p' + str(p):>7}" for p in PERCENTILES)
        + f" {'dead':>6}",
    ]
    for entry in report.layers:
        pct = " ".join(f"{entry.per_token_pct_percentiles[f'p{p}']:>7.2f}" for p in PERCENTILES)
        rows.append(f"{entry.layer:>5} {entry.d_ff:>6} {entry.nonzero_pct:>20.2f} {pct} {entry.dead_neurons:>6}")
    mean = sum(entry.nonzero_pct for entry in report.layers) / len(report.layers)
    rows.append(f"{'mean':>5} {'':>6} {mean:>20.2f}")
    return "\n".join(rows)


def sparsity_plots(report: SparsityReport, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    name = Path(report.model).name or report.model
    ylabel = "non-zero" if report.layers[0].measure == "nonzero_activations" else "positive pre-activation"
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    layers = [entry.layer for entry in report.layers]
    left.bar(layers, [entry.nonzero_pct for entry in report.layers], color="tab:blue")
    left.set_xlabel("layer")
    left.set_ylabel(f"% {ylabel} per token")
    left.set_title(f"{name}: {ylabel} per layer")
    for entry in report.layers:
        x = np.linspace(0, 1, len(entry.firing_frequency_sorted))
        right.plot(x, entry.firing_frequency_sorted, label=f"layer {entry.layer}")
    right.set_xlabel("neurons, sorted by firing frequency (fraction of d_ff)")
    right.set_ylabel("share of tokens the neuron fires on")
    right.set_title("per-neuron firing frequency (Li et al. 2022, Fig. 3)")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = folder / f"sparsity_{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
