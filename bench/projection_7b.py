"""docs/results/projection-7b.md: a projection, not a measurement, of 7B-model decode speed.

    python bench/projection_7b.py                    # measure the parts, write the page

What is measured here, on this machine, in one run: one MLP layer dense vs approximate at the
two 7B shapes (LLaMA-7B gated 4096x11008, OPT-6.7B-like 4096x16384; random weights, batch 1,
k = 10 % of d_ff: the 90 % activation sparsity ProSparse and TurboSparse report), one
attention layer's decode step (q, k, v, o projections and attention over a KV cache of
--context positions), and the output projection over a 32,000-token vocabulary, all fp32.
What is assumed: a 32-layer model is 32 such layers plus the output projection, nothing else
costs anything, the trained model's neurons are as easy to find as the random ones at the
probed fraction, and every layer is approximated. Nothing else may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.pages import REPO, head  # noqa: E402

PAGE = REPO / "docs" / "results" / "projection-7b.md"
LAYERS, D_MODEL, HEADS, VOCAB = 32, 4096, 32, 32_000
SHAPES = ((11008, True, "LLaMA-7B, gated"), (16384, False, "OPT-6.7B-like, ReLU"))
SPARSITY = 0.9


def attention_step_us(context: int, repeats: int) -> float:
    """One decode step of one attention layer: the four projections and attention over the cache."""
    from ann_mlp.timing import time_calls

    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(D_MODEL, D_MODEL, generator=generator) * D_MODEL**-0.5 for _ in range(4)]
    head = D_MODEL // HEADS
    keys = torch.randn(1, HEADS, context, head, generator=generator)  # (1, H, L, d_head)
    values = torch.randn(1, HEADS, context, head, generator=generator)
    x = torch.randn(1, 1, D_MODEL, generator=generator)

    def step() -> torch.Tensor:
        q, k, v = (F.linear(x, w).view(1, 1, HEADS, head).transpose(1, 2) for w in weights[:3])  # (1, H, 1, d_head)
        attended = F.scaled_dot_product_attention(q, torch.cat([keys, k], 2), torch.cat([values, v], 2))
        return F.linear(attended.transpose(1, 2).reshape(1, 1, D_MODEL), weights[3])

    with torch.inference_mode():
        return statistics.median(time_calls(step, repeats)) * 1e6


def output_projection_us(repeats: int) -> float:
    from ann_mlp.timing import time_calls

    weight = torch.randn(VOCAB, D_MODEL) * D_MODEL**-0.5
    x = torch.randn(1, D_MODEL)
    with torch.inference_mode():
        return statistics.median(time_calls(lambda: F.linear(x, weight), repeats)) * 1e6


def measure(results: Path, probe_fraction: float, context: int, repeats: int) -> dict:
    results.mkdir(parents=True, exist_ok=True)
    layer_file = results / "bench_layer_7b.jsonl"
    layer_file.unlink(missing_ok=True)
    for d_ff, gated, _ in SHAPES:
        k = round(d_ff * (1 - SPARSITY))
        command = [
            sys.executable,
            "-m",
            "ann_mlp",
            "bench",
            "layer",
            "--d-model",
            str(D_MODEL),
            "--d-ff",
            str(d_ff),
            *(["--gated"] if gated else []),
            "--batch",
            "1",
            "--k",
            str(k),
            "--probe-fraction",
            str(probe_fraction),
            "--repeats",
            str(repeats),
            "--json",
            str(layer_file),
        ]
        print("+", " ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, cwd=REPO)
    torch.set_num_threads(2)
    return {
        "layers": [json.loads(line) for line in layer_file.read_text().splitlines()],
        "attention_us": attention_step_us(context, repeats),
        "output_us": output_projection_us(repeats),
        "context": context,
        "probe_fraction": probe_fraction,
    }


def page(measured: dict, command: str) -> str:
    attention, output = measured["attention_us"], measured["output_us"]
    rows = [
        *head(
            "Projection: decode speed of a 7B ReLU model at 90 % activation sparsity",
            command,
            machine_note="; nothing else running.",
        ),
        "**A projection, not a measurement of a 7B model.** Measured in this run, fp32, batch 1:",
        f"one attention layer's decode step over a KV cache of {measured['context']} positions "
        f"({attention / 1e3:.2f} ms), the output projection over {VOCAB:,} tokens ({output / 1e3:.2f} ms), and "
        "one MLP layer dense vs approximate at each shape below (random weights, so timing only; "
        f"k = 10 % of d_ff; IVF probing {measured['probe_fraction']:.0%} of its lists). Assumed: the model is "
        f"{LAYERS} such layers plus the output projection and nothing else costs time; a trained "
        "model's firing neurons are found at the same probed fraction; every layer is approximated.",
        "",
        "| MLP shape | dense MLP ms | approx MLP ms | MLP speedup | bytes read | dense tok/s | approx tok/s | projected speedup |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for layer, (_, _, what) in zip(measured["layers"], SHAPES):
        dense_step = LAYERS * (attention + layer["dense_us"]) + output  # µs per token
        approx_step = LAYERS * (attention + layer["approx_us"]) + output
        rows.append(
            f"| {layer['d_model']}x{layer['d_ff']} ({what}) | {layer['dense_us'] / 1e3:.2f} | "
            f"{layer['approx_us'] / 1e3:.2f} | {layer['speedup']:.2f}x | {layer['bytes_read_fraction']:.3f} | "
            f"{1e6 / dense_step:.2f} | {1e6 / approx_step:.2f} | {dense_step / approx_step:.2f}x |"
        )
    rows += [
        "",
        "For scale: PowerInfer reports 2.1-2.3x over llama.cpp on CPUs for ReLU-sparse 7B-class models "
        "(its published figures, not run here). The projection above compares against this project's "
        "own dense fp32 path, not llama.cpp's quantized kernels, and its ceiling is set by attention: "
        "with every MLP free, a step would still take the attention and output time.",
        "",
        f"With every MLP free: {1e6 / (LAYERS * attention + output):.2f} tok/s.",
    ]
    return "\n".join(rows) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe-fraction", type=float, default=0.25, help="IVF lists probed")
    parser.add_argument("--context", type=int, default=512, help="KV cache positions for the attention step")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--results", type=Path, default=REPO / "results" / "projection")
    args = parser.parse_args()
    command = "python bench/projection_7b.py" + (
        f" --probe-fraction {args.probe_fraction}" if args.probe_fraction != 0.25 else ""
    )
    measured = measure(args.results, args.probe_fraction, args.context, args.repeats)
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page(measured, command))
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
