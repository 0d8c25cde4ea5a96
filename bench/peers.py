"""Every candidate-selection method side by side on the same real hidden states: table and plots.

    python bench/peers.py                                   # all models, all backends
    python bench/peers.py --models topk-lm --backends ivf lowrank   # replaces these two, keeps the rest
    python bench/peers.py --table-only                      # re-print from results/peers/

Per model and layer: calibration hidden states (stdlib calibration docstrings)
build each backend; held-out hidden states (the evaluation docstrings) are
searched at a sweep of efforts, and each point records recall@k, keys scanned,
bytes read (everything read to choose candidates, re-rank included) and the
MLP's relative output error, exactly as `ann-mlp eval` measures them, and the
batch-1 speedup of the approximate MLP over the layer's best dense path (median
µs per held-out token, both timed in the same run: run it on a quiet machine).
The peers
are backends too: faiss IVF and HNSW, ScaNN, PQ fast-scan + re-rank, a Deja
Vu-style trained predictor (`dejavu`), TEAL-style input sparsity (`teal`), beside
the query-aware `cells` and `lowrank`.

The table gives, per model and backend, the layer-mean of the cheapest swept
point reaching recall 0.95 on the held-out queries (the frontier, as
ann-benchmarks reports it; a build tunes on calibration queries instead), or the
best recall reached when no point does. Plots per model: recall vs bytes read,
recall vs keys scanned, output error vs bytes read, recall vs batch-1 speedup
(layer means); and recall vs speedup per layer, as ann-benchmarks plots recall
vs queries per second.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from ann_mlp.approx_mlp import ApproxMLP, augmented_keys, augmented_queries
from ann_mlp.benchmark import dense_paths
from ann_mlp.build import capture_calibration
from ann_mlp.capture import batches, forward_capturing
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.config import BuildConfig, TextConfig
from ann_mlp.evaluate import LayerTotals
from ann_mlp.index import BACKENDS, build_index
from ann_mlp.text import passages
from ann_mlp.timing import time_calls

REPO = Path(__file__).resolve().parent.parent
MODELS = {"topk-lm": 128, "relu-lm": 128, "minilm-sparse": 96, "minilm": 128}  # name -> k
BACKEND_ORDER = ["ivf", "hnsw", "scann", "pq", "teal", "dejavu", "cells", "lowrank"]
TARGET_RECALL = 0.95
SWEEP_POINTS = 12
EVAL_TOKENS = 2048
TIMED_CALLS = 64  # per sweep point, one held-out token per call


def held_out_inputs(checkpoint, tokens: int) -> list[torch.Tensor]:
    """MLP inputs per layer on the evaluation split: (n_tokens, d_model) each."""
    captured: list[list[torch.Tensor]] = [[] for _ in range(checkpoint.num_layers)]
    for batch in batches(checkpoint, passages(None, "evaluation"), TextConfig(max_tokens=tokens)):
        _, inputs = forward_capturing(checkpoint, batch, range(checkpoint.num_layers))
        for layer, x in inputs.items():
            captured[layer].append(x)
    return [torch.cat(x) for x in captured]


def batch1_us(call, x: torch.Tensor) -> float:
    """Median µs of call(token) over held-out tokens x (n, d_model), one token per call."""
    tokens = itertools.cycle(x[:TIMED_CALLS].split(1))  # (1, d_model) each
    with torch.inference_mode():
        return statistics.median(time_calls(lambda: call(next(tokens)), TIMED_CALLS)) * 1e6


def effort_sweep(lo: int, hi: int) -> list[int]:
    return sorted({int(round(v)) for v in np.geomspace(lo, hi, SWEEP_POINTS)})


def run_model(
    name: str, k: int, backends: list[str], out: Path, calibration_tokens: int = 16384, eval_tokens: int = EVAL_TOKENS
) -> list[dict]:
    """Sweep every backend on every layer of checkpoint `name`; records also go to out/peers_<name>.jsonl."""
    checkpoint = load_checkpoint(name)
    config = BuildConfig(calibration=TextConfig(max_tokens=calibration_tokens))
    tune, _, _ = capture_calibration(checkpoint, config, ())
    held_out = held_out_inputs(checkpoint, eval_tokens)
    records = []
    for layer in range(checkpoint.num_layers):
        weights = checkpoint.adapter.mlp_weights(layer)
        keys = augmented_keys(weights)  # (d_ff, d_model + 1)
        learn = augmented_queries(tune[layer])  # (N, d_model + 1)
        x = held_out[layer]  # (n, d_model)
        dense_us = min(batch1_us(path, x) for path in dense_paths(weights).values())
        for backend in backends:
            start = time.perf_counter()
            index = build_index(backend, keys, queries=learn, k=k, target_recall=TARGET_RECALL)
            build_seconds = time.perf_counter() - start
            for effort in effort_sweep(*index.effort_range(k)):
                mlp = ApproxMLP(weights, index, k, {index.effort_param: effort})
                totals = LayerTotals()
                with torch.inference_mode():
                    totals.add(mlp, x)
                point = totals.report(layer, mlp)
                approx_us = batch1_us(mlp, x)
                records.append(
                    {
                        "model": Path(name).name,
                        "layer": layer,
                        "backend": backend,
                        "k": k,
                        "effort_param": index.effort_param,
                        "effort": effort,
                        "build_params": index.build_params,
                        "recall_at_k": point.recall_at_k,
                        "scanned_fraction": point.scanned_fraction,
                        "bytes_read_fraction": point.bytes_read_fraction,
                        "rel_output_error": point.rel_output_error,
                        "mass_recall": point.mass_recall,
                        "build_seconds": round(build_seconds, 2),
                        "held_out_tokens": len(x),
                        "dense_us": round(dense_us, 3),
                        "approx_us": round(approx_us, 3),
                        "speedup": dense_us / approx_us,
                    }
                )
            print(f"{Path(name).name} layer {layer} {backend}: built in {build_seconds:.1f}s", flush=True)
    merge_records(out / f"peers_{Path(name).name}.jsonl", records, backends)
    return records


def merge_records(path: Path, records: list[dict], backends: list[str]) -> None:
    """Replace the swept backends' records in path, keep the other backends' (a run of one backend
    adds it to the comparison); the file is swapped in whole, never left half-written."""
    kept = (
        []
        if not path.exists()
        else [line for line in path.read_text().splitlines() if json.loads(line)["backend"] not in backends]
    )
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in kept) + "".join(json.dumps(r) + "\n" for r in records))
    partial.replace(path)


def operating_point(points: list[dict]) -> dict:
    """The cheapest point (bytes read) reaching the target recall, else the most accurate one."""
    reaching = [p for p in points if p["recall_at_k"] >= TARGET_RECALL]
    if reaching:
        return min(reaching, key=lambda p: p["bytes_read_fraction"])
    return max(points, key=lambda p: p["recall_at_k"])


def by_key(records: list[dict], *fields: str) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(record[f] for f in fields), []).append(record)
    return groups


def table(records: list[dict]) -> str:
    rows = [
        f"| model | backend | recall@k | bytes read | keys scanned | output error | batch-1 speedup "
        f"| reaches {TARGET_RECALL} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (model, backend), points in by_key(records, "model", "backend").items():
        chosen = [operating_point(layer_points) for layer_points in by_key(points, "layer").values()]
        mean = {
            f: statistics.mean(p[f] for p in chosen)
            for f in ("recall_at_k", "bytes_read_fraction", "scanned_fraction", "rel_output_error", "speedup")
        }
        reached = sum(p["recall_at_k"] >= TARGET_RECALL for p in chosen)
        rows.append(
            f"| {model} | {backend} | {mean['recall_at_k']:.3f} | {mean['bytes_read_fraction']:.3f} | "
            f"{mean['scanned_fraction']:.3f} | {mean['rel_output_error']:.3f} | {mean['speedup']:.2f}× | "
            f"{reached}/{len(chosen)} layers |"
        )
    return "\n".join(rows)


def plots(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    panels = [
        ("bytes_read_fraction", "recall_at_k"),
        ("scanned_fraction", "recall_at_k"),
        ("bytes_read_fraction", "rel_output_error"),
        ("speedup", "recall_at_k"),
    ]
    for (model,), model_records in by_key(records, "model").items():
        fig, axes = plt.subplots(1, len(panels), figsize=(21, 4.8))
        for (backend,), points in by_key(model_records, "backend").items():
            # Layer means at each sweep position: every layer of a model sweeps the same efforts.
            curve = by_key(points, "effort")
            for ax, (x_field, y_field) in zip(axes, panels):
                xs = [statistics.mean(p[x_field] for p in curve[e]) for e in sorted(curve)]
                ys = [statistics.mean(p[y_field] for p in curve[e]) for e in sorted(curve)]
                ax.plot(xs, ys, marker=".", label=backend)
        for ax, (x_field, y_field) in zip(axes, panels):
            ax.set_xlabel(x_field.replace("_", " "))
            ax.set_ylabel(y_field.replace("_", " "))
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
        axes[0].axhline(TARGET_RECALL, color="grey", lw=0.8, ls="--")
        axes[0].axvline(1 / 8, color="grey", lw=0.8, ls=":")
        axes[0].legend(fontsize=8)
        axes[3].axvline(1, color="grey", lw=0.8, ls=":")
        fig.suptitle(f"{model}: held-out stdlib docstrings, k = {model_records[0]['k']}, layer means")
        fig.tight_layout()
        path = out / f"peers_{model}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
        written.append(_speed_per_layer(plt, model, model_records, out))
    return written


def _speed_per_layer(plt, model: str, records: list[dict], out: Path) -> Path:
    """Recall vs batch-1 speedup over the best dense path, one panel per layer, one line per backend."""
    layers = by_key(records, "layer")
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 4), squeeze=False)
    for ax, ((layer,), points) in zip(axes[0], sorted(layers.items())):
        for (backend,), curve in by_key(points, "backend").items():
            curve.sort(key=lambda p: p["effort"])
            ax.plot([p["speedup"] for p in curve], [p["recall_at_k"] for p in curve], marker=".", label=backend)
        ax.axvline(1, color="grey", lw=0.8, ls=":")
        ax.axhline(TARGET_RECALL, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("speedup over dense, batch 1")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("recall at k")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{model}: recall vs speed (held-out tokens, real weights)")
    fig.tight_layout()
    path = out / f"peers_{model}_speed.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--backends", nargs="+", default=BACKEND_ORDER, choices=[b for b in BACKENDS if b != "exact"])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "peers")
    parser.add_argument("--table-only", action="store_true", help="Re-print table and plots from --out.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for model in args.models:
            run_model(model, MODELS[model], args.backends, args.out)
    records = [
        json.loads(line)
        for model in args.models
        if (args.out / f"peers_{model}.jsonl").exists()
        for line in (args.out / f"peers_{model}.jsonl").read_text().splitlines()
    ]
    print(table(records))
    for path in plots(records, args.out):
        print(f"wrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
