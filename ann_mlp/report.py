"""Render an evaluation report: a table for the terminal, JSON for tools, PNG plots for people."""

from __future__ import annotations

import json
from pathlib import Path

from ann_mlp.evaluate import Report

LAYER_COLUMNS = (
    "recall_at_k",
    "contribution_recall_at_k",
    "mass_recall",
    "scanned_fraction",
    "bytes_read_fraction",
    "rel_output_error",
)
WIDTH = 24  # of a column: its name


def table(report: Report) -> str:
    head = f"{'layer':>5} {'d_ff':>6} {'k':>5} " + " ".join(f"{c:>{WIDTH}}" for c in LAYER_COLUMNS) + "  search"
    rows = [head]
    for layer in report.layers:
        values = " ".join(f"{getattr(layer, c):>{WIDTH}.4f}" for c in LAYER_COLUMNS)
        rows.append(f"{layer.layer:>5} {layer.d_ff:>6} {layer.k:>5} {values}  {layer.search_params}")
    count = max(len(report.layers), 1)
    means = " ".join(f"{sum(getattr(entry, c) for entry in report.layers) / count:>{WIDTH}.4f}" for c in LAYER_COLUMNS)
    rows.append(f"{'mean':>5} {'':>6} {'':>5} {means}")
    if any(entry.gated for entry in report.layers):
        rows.append(
            "gated layers: recall_at_k is measured against the gate ranking the index searches; "
            "contribution_recall_at_k against the k largest |act(gate)*up|, which the model keeps"
        )
    costly = [entry.layer for entry in report.layers if entry.bytes_read_fraction > 1]
    if costly:
        rows.append(
            f"layers {costly}: the approximate path reads more bytes than the dense layer "
            "(bytes_read_fraction > 1): approximation cannot pay there"
        )
    rows.append("")
    rows.append(
        f"end to end ({report.model}, {report.family}, backend={report.backend}, k={report.k}, "
        f"{text_summary(report.text)}):"
    )
    rows.extend(f"  {name:<24} {value:.4f}" for name, value in report.end_to_end.items())
    for name in ("exact_vs_reference", "approx_vs_reference"):
        if name in report.extra:
            rows.append(f"{name.replace('_', ' ')} ({report.extra['reference']}):")
            rows.extend(f"  {metric:<24} {value:.4f}" for metric, value in report.extra[name].items())
    rows.extend(f"warning: {warning}" for warning in report.text["warnings"])
    return "\n".join(rows)


SHIFT_COLUMNS = ("recall_at_k", "mass_recall", "bytes_read_fraction", "rel_output_error")


def shift_table(first: Report, second: Report) -> str:
    """How a store's fidelity moves from one text to another, per layer and end to end: each
    measure on the first text, on the second, and the change, so a user sees whether a store
    calibrated on their text holds on another."""
    rows = [f"text shift: {first.text['source']} -> {second.text['source']}"]
    rows.append(f"{'layer':>5} " + " ".join(f"{c:>33}" for c in SHIFT_COLUMNS))
    for before, after in zip(first.layers, second.layers):
        cells = (f"{_change(getattr(before, c), getattr(after, c)):>33}" for c in SHIFT_COLUMNS)
        rows.append(f"{before.layer:>5} " + " ".join(cells))
    rows.append("end to end:")
    for name, value in first.end_to_end.items():
        if name in second.end_to_end and name != "positions":
            rows.append(f"  {name:<24} {_change(value, second.end_to_end[name])}")
    return "\n".join(rows)


def _change(before: float, after: float) -> str:
    return f"{before:.4f} -> {after:.4f} ({after - before:+.4f})"


def text_summary(text: dict) -> str:
    """How much text a report measured, in words: tokens, passages, how long ones were handled."""
    handled = f", {text['split']} split into windows" if text["split"] else ""
    handled += f", {text['truncated']} cut" if text["truncated"] else ""
    extent = "the whole text" if text["whole_text"] else "until the token budget"
    passages = f"{text['passages']} passage" + ("" if text["passages"] == 1 else "s")
    return (
        f"{text['tokens']} tokens in {passages}{handled} (limit {text['limit']} tokens per "
        f"sequence), {extent} of {text['source']}"
    )


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_json(), indent=2) + "\n")


def write_plots(report: Report, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    layers = [entry.layer for entry in report.layers]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, 0.35 * len(layers) + 3), 7), sharex=True)
    for column, marker in zip(("recall_at_k", "mass_recall", "scanned_fraction", "bytes_read_fraction"), "osv^"):
        top.plot(layers, [getattr(entry, column) for entry in report.layers], marker=marker, label=column)
    top.set_ylim(0, 1.05)
    top.set_ylabel("fraction")
    top.legend(loc="best", fontsize=8)
    top.set_title(
        f"{report.model}: backend={report.backend}, k={report.k}\n"
        f"{report.text['tokens']} tokens, {report.text['passages']} passages",
        fontsize=10,
    )
    bottom.bar(layers, [entry.rel_output_error for entry in report.layers], color="tab:red")
    bottom.set_ylabel("relative MLP output error")
    bottom.set_xlabel("layer")
    fig.tight_layout()
    path = folder / f"eval_{report.model}_{report.backend}_k{report.k}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
