"""docs/results/checkpoints.md: what the runs that made the repository's own checkpoints recorded.

    python bench/checkpoint_tables.py

Reads what `bench/train_relu_lm.py --finish` and `ann-mlp sparsify` write beside each model in
bench/models/ (training.json and train_log.jsonl; sparsify_report.json) and writes the page with
the command, commit, date and machine on top. Nothing is measured here: the figures are the runs'
own, taken on held-out text when the models were written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.pages import REPO, head  # noqa: E402

PAGE = REPO / "docs" / "results" / "checkpoints.md"
MODELS = REPO / "bench" / "models"


def percents(values: list[float]) -> str:
    return " / ".join(f"{value:.2f}" for value in values) + " %"


def trained_row(name: str, folder: Path) -> str:
    training = json.loads((folder / "training.json").read_text())
    last = json.loads((folder / "train_log.jsonl").read_text().splitlines()[-1])
    args = training["args"]
    shape = f"{args['layers']} × {args['d_model']}×{args['d_ff']}" + (f", Top-{args['topk']}" if args["topk"] else "")
    return (
        f"| {name} | {shape} | {training['step']} steps, {training['tokens_seen'] / 1e6:.2f} M tokens, "
        f"{training['train_seconds'] / 3600:.2f} h on {args['threads']} thread(s) | "
        f"{training['corpus']['package']} held out: loss {last['loss']:.2f}, next-token accuracy "
        f"{last['accuracy']:.3f} (step {last['step']}) | {percents(last['nonzero_pct'])} |"
    )


def sparsified_row(name: str, folder: Path) -> str:
    report = json.loads((folder / "sparsify_report.json").read_text())
    against = report["against_original"]
    config = json.loads((folder / "config.json").read_text())
    method = report["method"] + (f" {report['k']}" if report["k"] else "")
    return (
        f"| {name} | {report['original']}: {config['num_hidden_layers']} × {config['hidden_size']}×"
        f"{config['intermediate_size']}, {method} | "
        f"{report['steps']} steps, {report['tokens_seen'] / 1e6:.2f} M tokens, {report['train_seconds'] / 3600:.2f} h, "
        f"on {', '.join(report['train_text'])} | against {report['original']} on {report['report_text']}: "
        f"embedding cosine {against['embedding_cosine_mean']:.3f} (min {against['embedding_cosine_min']:.3f}), "
        f"nearest-neighbour agreement {against['neighbour_agreement']:.3f}{held_out(report)} | "
        f"{percents(report['nonzero_pct'])} |"
    )


def held_out(report: dict) -> str:
    """The report's figures on the kind of text left out of training, when it has them."""
    if not report.get("held_out_text"):
        return ""
    against = report["held_out_against_original"]
    return (
        f"; on {report['held_out_text']}, a kind left out of training: cosine {against['embedding_cosine_mean']:.3f} "
        f"(min {against['embedding_cosine_min']:.3f}), agreement {against['neighbour_agreement']:.3f}"
    )


def page() -> str:
    rows = [
        *head("Checkpoints trained and sparsified here", "python bench/checkpoint_tables.py"),
        "What each run recorded when it wrote its model (`training.json` and the last line of",
        "`train_log.jsonl`; `sparsify_report.json`). Non-zero share: activations above zero per token and",
        "layer on held-out text, the share the method's speed rests on.",
        "",
        "| checkpoint | MLPs | training | held-out quality | non-zero per token, per layer |",
        "| --- | --- | --- | --- | --- |",
    ]
    for folder in sorted(path for path in MODELS.iterdir() if (path / "config.json").is_file()):
        if (folder / "training.json").exists():
            rows.append(trained_row(folder.name, folder))
        elif (folder / "sparsify_report.json").exists():
            rows.append(sparsified_row(folder.name, folder))
    return "\n".join(rows) + "\n"


def main() -> int:
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page())
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
