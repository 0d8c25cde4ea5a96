"""docs/results/fidelity.md: how close each built-in's store, built with the defaults, stays to its model.

    python bench/fidelity_tables.py                    # build missing stores, evaluate, write the page
    python bench/fidelity_tables.py --stores relu-lm   # a page of these stores alone
    python bench/fidelity_tables.py --table-only       # rewrite the page from results/fidelity/

Runs `ann-mlp eval` on each store over the held-out standard-library docstrings and, in the same
run, the licence texts (a kind of text no checkpoint trained, distilled or calibrated on) into
results/fidelity/<store>.json, then writes the page with the command, commit, date and machine on
top: two lines per store (in-domain, held out), then each store's layers.
Fidelity does not depend on timing, so it may run beside other work.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from ann_mlp.text import HELD_OUT_SOURCE  # noqa: E402  (a kind no built-in was trained or calibrated on)
from bench.pages import REPO, ann_mlp, current, end_to_end, head, store_tables_main  # noqa: E402

PAGE = REPO / "docs" / "results" / "fidelity.md"
# store -> (checkpoint, build options, eval options); the stores decode_tables.py builds share these options
STORES: dict[str, tuple[str, list[str], list[str]]] = {
    "relu-lm": ("relu-lm", [], []),
    "topk-lm": ("topk-lm", [], []),
    "wide-lm": ("wide-lm", ["--preset"], []),
    "minilm": ("minilm", [], []),
    "minilm-sparse": ("minilm-sparse", [], ["--reference", "minilm"]),
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
        ann_mlp(
            "eval", str(store), "--json", str(results / f"{name}.json"), "--shift-text", HELD_OUT_SOURCE, *eval_args
        )


def build_line(store: Path) -> str:
    manifest = json.loads((store / "manifest.json").read_text())
    build = manifest["build"]
    return f"backend {build['backend']}, k {build['k']}, target recall {build['target_recall']}"


def page(results: Path, stores: list[str], command: str, indexes: Path = REPO / "indexes") -> str:
    reports = {name: json.loads((results / f"{name}.json").read_text()) for name in stores}
    rows = [
        *head("Fidelity: each built-in's store against its exact model", command),
        "Each store built with `ann-mlp build` and the options below (none: the defaults), evaluated by",
        "`ann-mlp eval --shift-text licenses` on two kinds of text in one run: in-domain, the held-out",
        "standard-library docstrings (modules no calibration used; a kind the default calibration mix and",
        "minilm-sparse's distillation include), and held out, the licence texts, a kind no checkpoint was",
        "trained, distilled or calibrated on. Per layer: recall@k of the exact top-k keys (gated layers:",
        "ranked by the gate), the share of activation mass the retrieved keys carry, the keys scored at any",
        "precision and the bytes read, both as fractions of a dense layer's, and the layer output's relative",
        "error. End to end: the approximate model against the exact one, and for minilm-sparse against the",
        "original MiniLM as well.",
        "",
        "| store | build | text | tokens | mean recall@k | mean bytes read (largest layer) | end to end |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, report in reports.items():
        checkpoint, build_args, _ = STORES[name]
        for label, measured in (("in-domain", report), ("held out", report["extra"]["text_shift"])):
            layers = measured["layers"]
            bytes_read = [layer["bytes_read_fraction"] for layer in layers]
            rows.append(
                f"| {name} | `{' '.join([checkpoint, *build_args])}` | {label}: {measured['text']['source']} | "
                f"{measured['text']['tokens']} | {statistics.mean(layer['recall_at_k'] for layer in layers):.3f} | "
                f"{statistics.mean(bytes_read):.3f} ({max(bytes_read):.3f}) | {end_to_end(measured)} |"
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
