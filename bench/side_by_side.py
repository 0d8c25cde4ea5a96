"""Build, evaluate and tabulate several checkpoints side by side, through the real CLI.

    python bench/side_by_side.py                       # the table, every row
    python bench/side_by_side.py --only relu-lm        # rows whose name contains "relu-lm"
    python bench/side_by_side.py --table-only          # re-print the table from results/
    python bench/side_by_side.py --only topk-lm-lowrank --write lowrank-options   # docs/results/lowrank-options.md

Each row is one store, built into indexes/<row> unless it exists (rows that differ
only in eval options share the first one's store), evaluated on
the held-out standard-library docstrings (text no checkpoint trained or
calibrated on) into results/eval_<row>.json. The table prints per-layer means and
the end-to-end metrics of each checkpoint's kind; `--write NAME` also writes it to
docs/results/NAME.md with the command, commit, date and machine on top.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.pages import REPO, ann_mlp, end_to_end, head  # noqa: E402

# The rows reported before build fit linear tail maps by default, built as they were then.
NO_MAP = ["--tail-map-rank", "0"]
# Gated rows reported before build chose neurons by estimated contribution, built as they were then.
BY_GATE = ["--no-gated-selection"]
# lowrank with its first pass refined, rank and refine rank chosen together.
REFINED = ["--backend", "lowrank", "--param", "refine_rank=auto"]
# lowrank ranking its candidates by 8-bit key codes and keeping their 8-bit scores.
CODES_8 = ["--param", "rerank_bits=8", "--param", "kept_bits=8"]
# lowrank re-ranking each query's keys within a margin of its k-th approximate score,
# its error basis in float32.
MARGIN = ["--param", "margin_rank=16", "--param", "error_basis_bits=32"]
# The same from 4-bit first-pass codes, σ_q counting their rounding, the basis from 8-bit codes.
MARGIN_4 = ["--param", "margin_rank=16", "--param", "code_bits=4"]
# Tail maps at rank d_ff / 64, the first default (relu-lm, topk-lm: 64; MiniLM, SmolLM2: 24).
MAP_64, MAP_24 = ["--tail-map-rank", "64"], ["--tail-map-rank", "24"]
# row name -> (checkpoint, build options, eval options)
ROWS: dict[str, tuple[str, list[str], list[str]]] = {
    "minilm-ivf": ("minilm", [*NO_MAP, "--backend", "ivf"], []),
    "minilm-cells": ("minilm", [*NO_MAP, "--backend", "cells"], []),
    "minilm-lowrank": ("minilm", [*NO_MAP, "--backend", "lowrank"], []),
    "smollm2-ivf": ("smollm2", [*BY_GATE, *NO_MAP, "--backend", "ivf"], []),
    "relu-lm-ivf": ("relu-lm", [*NO_MAP, "--backend", "ivf"], []),
    "relu-lm-cells": ("relu-lm", [*NO_MAP, "--backend", "cells"], []),
    "relu-lm-cells-mass": ("relu-lm", [*NO_MAP, "--backend", "cells", "--k", "1024", "--mass-target", "0.9"], []),
    "relu-lm-lowrank": ("relu-lm", [*NO_MAP, "--backend", "lowrank"], []),
    "relu-lm-lowrank-mass": ("relu-lm", [*NO_MAP, "--backend", "lowrank", "--k", "1024", "--mass-target", "0.9"], []),
    "relu-lm-lowrank-mass-98": (
        "relu-lm",
        [*NO_MAP, "--backend", "lowrank", "--k", "1024", "--mass-target", "0.9", "--target-recall", "0.98"],
        [],
    ),
    "topk-lm-ivf": ("topk-lm", [*NO_MAP, "--backend", "ivf"], []),
    "topk-lm-cells": ("topk-lm", [*NO_MAP, "--backend", "cells"], []),
    "topk-lm-lowrank": ("topk-lm", [*NO_MAP, "--backend", "lowrank"], []),
    "topk-lm-lowrank-98": ("topk-lm", [*NO_MAP, "--backend", "lowrank", "--target-recall", "0.98"], []),
    "minilm-sparse-ivf": ("minilm-sparse", [*NO_MAP, "--backend", "ivf", "--k", "96"], ["--reference", "minilm"]),
    "minilm-sparse-cells": ("minilm-sparse", [*NO_MAP, "--backend", "cells", "--k", "96"], ["--reference", "minilm"]),
    "minilm-sparse-lowrank": (
        "minilm-sparse",
        [*NO_MAP, "--backend", "lowrank", "--k", "96"],
        ["--reference", "minilm"],
    ),
    "minilm-sparse-lowrank-80": (
        "minilm-sparse",
        [*NO_MAP, "--backend", "lowrank", "--k", "96", "--target-recall", "0.8"],
        ["--reference", "minilm"],
    ),
    # Candidates ranked by 8-bit codes of the keys, the k kept scored exactly (rerank_bits=8).
    "minilm-sparse-lowrank8": (
        "minilm-sparse",
        [*NO_MAP, "--backend", "lowrank", "--k", "96", "--param", "rerank_bits=8"],
        ["--reference", "minilm"],
    ),
    "minilm-sparse-lowrank8-99": (
        "minilm-sparse",
        [*NO_MAP, "--backend", "lowrank", "--k", "96", "--param", "rerank_bits=8", "--target-recall", "0.99"],
        ["--reference", "minilm"],
    ),
    "topk-lm-lowrank8-98": (
        "topk-lm",
        [*NO_MAP, "--backend", "lowrank", "--target-recall", "0.98", "--param", "rerank_bits=8"],
        [],
    ),
    "topk-lm-lowrank8-99": (
        "topk-lm",
        [*NO_MAP, "--backend", "lowrank", "--target-recall", "0.99", "--param", "rerank_bits=8"],
        [],
    ),
    # No float32 key read: candidates ranked and the k kept scored from 8-bit codes of the keys.
    "relu-lm-lowrank8k-mass": (
        "relu-lm",
        [*NO_MAP, "--backend", "lowrank", "--k", "1024", "--mass-target", "0.9", *CODES_8],
        [],
    ),
    "relu-lm-lowrank8k-mass95": (
        "relu-lm",
        [*NO_MAP, "--backend", "lowrank", "--k", "2048", "--mass-target", "0.95", *CODES_8],
        [],
    ),
    "topk-lm-lowrank8k-99": ("topk-lm", [*NO_MAP, "--backend", "lowrank", "--target-recall", "0.99", *CODES_8], []),
    "minilm-sparse-lowrank8k": (
        "minilm-sparse",
        [*NO_MAP, "--backend", "lowrank", "--k", "96", *CODES_8],
        ["--reference", "minilm"],
    ),
    "minilm-sparse-lowrank8k-97": (
        "minilm-sparse",
        [*NO_MAP, "--backend", "lowrank", "--k", "96", *CODES_8, "--target-recall", "0.97"],
        ["--reference", "minilm"],
    ),
    # With the linear tail map, at rank d_ff / 64 as first measured; the build's default
    # is now rank 16, and none for Top-k models, whose tail is zero.
    "relu-lm-lowrank-mass-map": (
        "relu-lm",
        [*MAP_64, "--backend", "lowrank", "--k", "1024", "--mass-target", "0.9"],
        [],
    ),
    "relu-lm-lowrank8k-mass95-map": (
        "relu-lm",
        [*MAP_64, "--backend", "lowrank", "--k", "2048", "--mass-target", "0.95", *CODES_8],
        [],
    ),
    "relu-lm-preset": ("relu-lm", ["--preset"], []),
    # An earlier served default (mass 0.9, recall 0.95, a fixed re-rank count).
    "relu-lm-preset-s10": ("relu-lm", ["--backend", "lowrank", "--k", "1024", "--mass-target", "0.9"], []),
    # Per-query re-rank margins.
    "topk-lm-lowrank8k-99-margin": (
        "topk-lm",
        [*NO_MAP, "--backend", "lowrank", "--target-recall", "0.99", *CODES_8, *MARGIN],
        [],
    ),
    "relu-lm-lowrank8k-mass95-99-margin": (
        "relu-lm",
        ["--backend", "lowrank", "--k", "2048", "--mass-target", "0.95", *CODES_8, "--target-recall", "0.99", *MARGIN],
        [],
    ),
    "relu-lm-lowrank8k-mass98-99-margin": (
        "relu-lm",
        ["--backend", "lowrank", "--k", "2048", "--mass-target", "0.98", *CODES_8, "--target-recall", "0.99", *MARGIN],
        [],
    ),
    "minilm-sparse-lowrank8k-96-margin": (
        "minilm-sparse",
        [*NO_MAP, "--backend", "lowrank", "--k", "96", *CODES_8, "--target-recall", "0.96", *MARGIN],
        ["--reference", "minilm"],
    ),
    "minilm-sparse-lowrank8k-97-margin": (
        "minilm-sparse",
        [*NO_MAP, "--backend", "lowrank", "--k", "96", *CODES_8, "--target-recall", "0.97", *MARGIN],
        ["--reference", "minilm"],
    ),
    "topk-lm-lowrank4-99-margin": (
        "topk-lm",
        [*NO_MAP, "--backend", "lowrank", "--target-recall", "0.99", *CODES_8, *MARGIN_4],
        [],
    ),
    "relu-lm-lowrank4-mass98-99-margin": (
        "relu-lm",
        [
            "--backend",
            "lowrank",
            "--k",
            "2048",
            "--mass-target",
            "0.98",
            *CODES_8,
            "--target-recall",
            "0.99",
            *MARGIN_4,
        ],
        [],
    ),
    # Rank 112 (not auto): at the same recall a higher rank's misses sit nearer the cut, which keeps the embedding.
    "minilm-sparse-lowrank4-112-96-margin": (
        "minilm-sparse",
        [
            *NO_MAP,
            "--backend",
            "lowrank",
            "--k",
            "96",
            *CODES_8,
            "--param",
            "rank=112",
            "--target-recall",
            "0.96",
            *MARGIN_4,
        ],
        ["--reference", "minilm"],
    ),
    "relu-lm-lowrank8k-mass95-98-map": (
        "relu-lm",
        [*MAP_64, "--backend", "lowrank", "--k", "2048", "--mass-target", "0.95", *CODES_8, "--target-recall", "0.98"],
        [],
    ),
    "relu-lm-lowrank8k-mass95-99": (
        "relu-lm",
        ["--backend", "lowrank", "--k", "2048", "--mass-target", "0.95", *CODES_8, "--target-recall", "0.99"],
        [],
    ),
    # The same with k at most d_ff / 8: layer 0 fires about a quarter of its neurons, and keeping 0.95
    # of its mass (k = 944) cost it 0.184 of its key bytes.
    "relu-lm-lowrank8k-512-mass95-99": (
        "relu-lm",
        ["--backend", "lowrank", "--k", "512", "--mass-target", "0.95", *CODES_8, "--target-recall", "0.99"],
        [],
    ),
    "topk-lm-lowrank8k-99-map": ("topk-lm", [*MAP_64, "--backend", "lowrank", "--target-recall", "0.99", *CODES_8], []),
    "minilm-lowrank-map": ("minilm", [*MAP_24, "--backend", "lowrank"], []),
    "minilm-sparse-lowrank8k-97-map": (
        "minilm-sparse",
        [*MAP_24, "--backend", "lowrank", "--k", "96", *CODES_8, "--target-recall", "0.97"],
        ["--reference", "minilm"],
    ),
    # The first pass refined: the build picks rank and refine rank together.
    "minilm-sparse-lowrank8k-96-refined": (
        "minilm-sparse",
        [*NO_MAP, *REFINED, "--k", "96", *CODES_8, "--target-recall", "0.96"],
        ["--reference", "minilm"],
    ),
    "minilm-sparse-lowrank8k-97-refined": (
        "minilm-sparse",
        [*NO_MAP, *REFINED, "--k", "96", *CODES_8, "--target-recall", "0.97"],
        ["--reference", "minilm"],
    ),
    "topk-lm-lowrank8k-99-refined": ("topk-lm", [*NO_MAP, *REFINED, "--target-recall", "0.99", *CODES_8], []),
    "relu-lm-lowrank8k-mass95-99-refined": (
        "relu-lm",
        [*REFINED, "--k", "2048", "--mass-target", "0.95", *CODES_8, "--target-recall", "0.99"],
        [],
    ),
    # An earlier served default's settings, refined.
    "relu-lm-preset-refined": ("relu-lm", [*REFINED, "--k", "1024", "--mass-target", "0.9"], []),
    # Selection and tail correction on dense-activation models, with perfect retrieval (exact backend):
    # what is lost to top-k itself, before any index.
    "relu-lm-exact-mass95": ("relu-lm", [*NO_MAP, "--backend", "exact", "--k", "2048", "--mass-target", "0.95"], []),
    "relu-lm-exact-mass95-map": (
        "relu-lm",
        [*MAP_64, "--backend", "exact", "--k", "2048", "--mass-target", "0.95"],
        [],
    ),
    "minilm-exact-192": ("minilm", [*NO_MAP, "--backend", "exact", "--k", "192"], []),
    "minilm-exact-192-tail": ("minilm", [*NO_MAP, "--backend", "exact", "--k", "192", "--tail-correction"], []),
    "smollm2-exact-768": (
        "smollm2",
        [*BY_GATE, *NO_MAP, "--backend", "exact", "--k", "768", "--calib-tokens", "4096"],
        ["--max-tokens", "2048"],
    ),
    "smollm2-exact-768-product": (
        "smollm2",
        [*BY_GATE, *NO_MAP, "--backend", "exact", "--k", "768", "--calib-tokens", "4096"],
        ["--max-tokens", "2048", "--candidate-factor", "2"],
    ),
    "smollm2-exact-768-tail": (
        "smollm2",
        [*BY_GATE, *NO_MAP, "--backend", "exact", "--k", "768", "--calib-tokens", "4096", "--tail-correction"],
        ["--max-tokens", "2048"],
    ),
    "smollm2-exact-768-map": (
        "smollm2",
        [*BY_GATE, *MAP_24, "--backend", "exact", "--k", "768", "--calib-tokens", "4096"],
        ["--max-tokens", "2048"],
    ),
    "smollm2-exact-384-product": (
        "smollm2",
        [*BY_GATE, *NO_MAP, "--backend", "exact", "--k", "768", "--calib-tokens", "4096"],
        ["--max-tokens", "2048", "--k", "384", "--candidate-factor", "2"],
    ),
    # The default backend on the gated model: 1152 candidates by gate score, the 768 largest |silu(g)·u| kept.
    "smollm2-lowrank-768-product": (
        "smollm2",
        [*BY_GATE, *NO_MAP, "--backend", "lowrank", "--k", "768", "--calib-tokens", "4096"],
        ["--max-tokens", "2048", "--candidate-factor", "1.5"],
    ),
    "smollm2-exact-768-product-tail": (
        "smollm2",
        [*BY_GATE, *NO_MAP, "--backend", "exact", "--k", "768", "--calib-tokens", "4096", "--tail-correction"],
        ["--max-tokens", "2048", "--candidate-factor", "2"],
    ),
    # Gated selection as built by default: candidates per layer tuned at build, the k largest
    # |silu(g)·u| kept, u estimated from 8-bit codes of the up rows; with and without the default tail map.
    "smollm2-exact-768-chosen": (
        "smollm2",
        [*NO_MAP, "--backend", "exact", "--k", "768", "--calib-tokens", "4096"],
        ["--max-tokens", "2048"],
    ),
    "smollm2-exact-768-chosen-map": (
        "smollm2",
        ["--backend", "exact", "--k", "768", "--calib-tokens", "4096"],
        ["--max-tokens", "2048"],
    ),
}


def store_of(name: str) -> Path:
    """Rows with the same checkpoint and build options share one store: the first such row's."""
    checkpoint, build_args, _ = ROWS[name]
    first = next(row for row, (c, b, _) in ROWS.items() if (c, b) == (checkpoint, build_args))
    return REPO / "indexes" / first


def run_row(name: str, results: Path) -> None:
    checkpoint, build_args, eval_args = ROWS[name]
    store = store_of(name)
    if not (store / "manifest.json").exists():
        ann_mlp("build", checkpoint, "--out", str(store), *build_args)
    ann_mlp("eval", str(store), "--json", str(results / f"eval_{name}.json"), *eval_args)


def table(results: Path, names: list[str]) -> str:
    rows = [
        "| store | k | recall@k | keys scanned | bytes read | mass recall | rel. output error | end to end |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in names:
        path = results / f"eval_{name}.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        layers = report["layers"]
        ks = sorted({layer["k"] for layer in layers})
        k = str(ks[0]) if len(ks) == 1 else "/".join(str(layer["k"]) for layer in layers)

        def mean(field: str) -> float:
            return statistics.mean(layer[field] for layer in layers)

        rows.append(
            f"| {name} | {k} | {mean('recall_at_k'):.3f} | {mean('scanned_fraction'):.3f} | "
            f"{mean('bytes_read_fraction'):.3f} | {mean('mass_recall'):.3f} | "
            f"{mean('rel_output_error'):.3f} | {end_to_end(report)} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only", action="append", default=[], help="a row's name, or a string the rows' names contain (repeatable)"
    )
    parser.add_argument("--results", type=Path, default=REPO / "results")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--write", metavar="NAME", help="also write the table to docs/results/NAME.md")
    args = parser.parse_args()
    # A row's full name selects that row alone; any other string, the rows containing it.
    names = [
        name
        for name in ROWS
        if not args.only or any(part == name or (part not in ROWS and part in name) for part in args.only)
    ]
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for name in names:
            run_row(name, args.results)
    print(table(args.results, names))
    if args.write:
        page = REPO / "docs" / "results" / f"{args.write}.md"
        command = "python bench/side_by_side.py " + " ".join(sys.argv[1:])
        intro = [
            "Each row one store, built by `ann-mlp build` with the row's options (below), evaluated by",
            "`ann-mlp eval` on the held-out standard-library docstrings; per-layer means, and end to end",
            "the approximate model against the exact one. Bytes read: the index's bytes per query as a",
            "fraction of the dense layer's weights.",
            "",
        ]
        options = ["", "| store | checkpoint | build options |", "| --- | --- | --- |"] + [
            f"| {name} | {ROWS[name][0]} | `{' '.join(ROWS[name][1])}` |" for name in names
        ]
        page.write_text(
            "\n".join(
                [*head(f"Side by side: {args.write}", command.strip()), *intro, table(args.results, names), *options]
            )
            + "\n"
        )
        print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
