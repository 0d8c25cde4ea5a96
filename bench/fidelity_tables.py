"""docs/results/fidelity.md: how close each built-in's store, built as the README recommends, stays to its model.

    python bench/fidelity_tables.py                    # build missing stores, evaluate, write the page
    python bench/fidelity_tables.py --stores relu-lm   # a page of these stores alone
    python bench/fidelity_tables.py --table-only       # rewrite the page from results/fidelity/

Runs `ann-mlp eval` on each store over the held-out standard-library docstrings (text no
checkpoint trained or calibrated on) into results/fidelity/<store>.json, then writes the page
with the command, commit, date and machine on top: one line per store, then each store's layers.
Fidelity does not depend on timing, so it may run beside other work.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.pages import REPO, ann_mlp, current, end_to_end, head, store_tables_main  # noqa: E402

PAGE = REPO / "docs" / "results" / "fidelity.md"
# store -> (checkpoint, build options, eval options); the stores decode_tables.py builds share these options
STORES: dict[str, tuple[str, list[str], list[str]]] = {
    "relu-lm": ("relu-lm", ["--preset"], []),
    "topk-lm": ("topk-lm", ["--target-recall", "0.99"], []),
    "wide-lm": ("wide-lm", ["--preset"], []),
    "minilm": ("minilm", [], []),
    "minilm-sparse": ("minilm-sparse", ["--k", "96"], ["--reference", "minilm"]),
    # 30 layers: fewer tokens keep the run within minutes
    "smollm2": ("smollm2", [], ["--max-tokens", "2048"]),
}
LAYER_FIELDS = (
    ("recall@k", "recall_at_k"),
    ("mass recall", "mass_recall"),
    ("keys scanned", "scanned_fraction"),
    ("bytes read", "bytes_read_fraction"),
    ("rel. output error", "rel_output_error"),
)


def measure(results: Path, stores: list[str]) -> None:
    results.mkdir(parents=True, exist_ok=True)
    for name in stores:
        checkpoint, build_args, eval_args = STORES[name]
        store = REPO / "indexes" / name
        if not current(store):
            ann_mlp("build", checkpoint, "--out", str(store), *build_args, "--force")
        (results / f"{name}.json").unlink(missing_ok=True)  # eval appends nothing: the report is the file
        ann_mlp("eval", str(store), "--json", str(results / f"{name}.json"), *eval_args)


def build_line(store: Path) -> str:
    manifest = json.loads((store / "manifest.json").read_text())
    build = manifest["build"]
    return f"backend {build['backend']}, k {build['k']}, target recall {build['target_recall']}"


def page(results: Path, stores: list[str], command: str, indexes: Path = REPO / "indexes") -> str:
    reports = {name: json.loads((results / f"{name}.json").read_text()) for name in stores}
    rows = [
        *head("Fidelity: each built-in's store against its exact model", command),
        "Each store built as the README recommends (`ann-mlp build` options below), evaluated by `ann-mlp eval`",
        "on the held-out standard-library docstrings, text no checkpoint was trained or calibrated on",
        "(minilm-sparse was distilled on other docstrings of the same library). Per layer: recall@k of the",
        "exact top-k keys (gated layers: ranked by the gate), the share of activation mass the retrieved keys",
        "carry, the keys scored at any precision and the bytes read, both as fractions of a dense layer's, and",
        "the layer output's relative error. End to end: the approximate model against the exact one, and for",
        "minilm-sparse against the original MiniLM as well.",
        "",
        "| store | build | tokens | layers | mean recall@k | mean bytes read | end to end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, report in reports.items():
        checkpoint, build_args, _ = STORES[name]
        layers = report["layers"]
        rows.append(
            f"| {name} | `{' '.join([checkpoint, *build_args])}` | {report['text']['tokens']} | "
            f"{len(layers)} | {statistics.mean(layer['recall_at_k'] for layer in layers):.3f} | "
            f"{statistics.mean(layer['bytes_read_fraction'] for layer in layers):.3f} | {end_to_end(report)} |"
        )
    for name, report in reports.items():
        rows += [
            "",
            f"## {name}",
            "",
            f"{build_line(indexes / name)}; {report['text']['tokens']} tokens of {report['text']['source']}.",
            "",
            "| layer | d_ff | k | " + " | ".join(label for label, _ in LAYER_FIELDS) + " | search |",
            "| --- | --- | --- | " + " | ".join("---" for _ in LAYER_FIELDS) + " | --- |",
        ]
        for layer in report["layers"]:
            values = " | ".join(f"{layer[field]:.3f}" for _, field in LAYER_FIELDS)
            search = ", ".join(f"{key} {value}" for key, value in layer["search_params"].items())
            rows.append(f"| {layer['layer']} | {layer['d_ff']} | {layer['k']} | {values} | {search} |")
    return "\n".join(rows) + "\n"


def main() -> int:
    return store_tables_main(
        __doc__, "bench/fidelity_tables.py", list(STORES), REPO / "results" / "fidelity", PAGE, measure, page
    )


if __name__ == "__main__":
    sys.exit(main())
