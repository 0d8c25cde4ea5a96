"""Real-size shapes: build and serve LLaMA-shaped bfloat16 checkpoints within this machine's memory.

    python bench/scale.py --shapes small              # a 0.2 GB shape, a few minutes
    python bench/scale.py --shapes 1b --write         # TinyLlama-1.1B's shape; rewrites docs/results/scale.md
    python bench/scale.py --shapes 7b --write         # LLaMA-2-7B's shape: 14 GB on disk, hours; docs/results/scale-7b.md

Per shape, a randomly initialised LLaMA-shaped checkpoint is written with transformers
(`save_pretrained`, bfloat16, SmolLM2's tokenizer), once: a later run reuses it. Then, each in
its own process:
- build: `ann-mlp build` at k = d_ff/16 (planned, as by default), its wall time and peak resident
  memory (ru_maxrss);
- serve: `ann-mlp serve` on 127.0.0.1, its resident memory once ready, against the checkpoint's
  size in its own dtype;
- decode: `ann-mlp bench decode` at batch 1, exact and approximate tokens/s in the same turns;
- bytes: the MLP bytes one token reads, exact (every weight of every MLP, in bfloat16) and
  approximate (the index's bytes as `ann-mlp eval` counts them, plus the k kept up and value rows).

Random weights have no activation sparsity: the decode and bytes rows are timing and cost only;
their recall is not what the method reaches on a trained sparse model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from ann_mlp.store import ENTRY_PATTERN, partial_folder  # noqa: E402
from bench.load import free_port, start_server  # noqa: E402
from bench.pages import REPO, commit, write_table_page  # noqa: E402

PAGE = REPO / "docs" / "results" / "scale.md"
PAGE_7B = REPO / "docs" / "results" / "scale-7b.md"  # the 7B shape takes hours: run and documented on its own
BF16_BYTES = 2


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    def mlp_bytes_per_token(self) -> int:
        """Every weight of every gated MLP (gate, up, down), in bfloat16: what an exact token reads."""
        return 3 * self.intermediate * self.hidden * BF16_BYTES * self.layers


SHAPES = {
    "small": Shape(hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=8),
    "1b": Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4),  # TinyLlama-1.1B
    "7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32),  # LLaMA-2-7B
}


def write_checkpoint(shape: Shape, folder: Path) -> None:
    """A random LLaMA-shaped bfloat16 checkpoint with SmolLM2's tokenizer, written once (the
    weights go to a .partial folder renamed when complete, so an interrupted write is redone)."""
    if (folder / "config.json").exists():
        return
    import torch
    import transformers

    from ann_mlp.checkpoint import resolve_builtin

    gguf = resolve_builtin("smollm2")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    partial = folder.with_name(folder.name + ".partial")
    print(f"writing a random {folder.name} checkpoint to {folder}", flush=True)
    torch.set_default_dtype(torch.bfloat16)  # initialised in bfloat16: no float32 copy of the weights
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    del model
    partial.rename(folder)


def run_measured(*args: str) -> tuple[float, float]:
    """`python -m ann_mlp ARGS` in its own process: (wall seconds, peak resident GB)."""
    print("+ ann-mlp", " ".join(args), flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ann_mlp", *args], cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"ann-mlp {args[0]} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20  # ru_maxrss is in KiB


def served_rss_gb(store: Path) -> float:
    """Resident memory of a real `ann-mlp serve` once it is ready."""
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"ann-mlp-scale-{port}.log"
    proc = start_server(store, port, log)
    try:
        status = Path(f"/proc/{proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 2**20
    finally:
        proc.terminate()
        proc.wait(timeout=300)


def approx_bytes_per_token(report: dict, d_model: int) -> float:
    """MLP bytes one approximate token reads: the index's (as eval counts them, choosing included)
    plus the k kept rows of up and values, in bfloat16."""
    total = 0.0
    for layer in report["layers"]:
        index = layer["bytes_read_fraction"] * layer["d_ff"] * (d_model + 1) * 4  # of a float32 scan
        total += index + layer["k"] * d_model * BF16_BYTES * (2 if layer["gated"] else 1)
    return total


def measure(name: str, shape: Shape, work: Path, tokens: int) -> dict:
    checkpoint, store = work / name, work / f"{name}-store"
    write_checkpoint(shape, checkpoint)
    file_gb = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 2**30
    k = shape.intermediate // 16
    resumed = len(list(partial_folder(store).glob(ENTRY_PATTERN)))  # layers a stopped build left
    build_s, build_peak = run_measured(
        "build", str(checkpoint), "--out", str(store), "--k", str(k), "--target-recall", "0.9",
        "--calib-tokens", str(tokens), "--check-text", "none", "--force",
    )  # fmt: skip
    serve_gb = served_rss_gb(store)
    decode_json, eval_json = work / f"{name}-decode.jsonl", work / f"{name}-eval.json"
    decode_json.unlink(missing_ok=True)
    run_measured("bench", "decode", str(store), "--new-tokens", "16", "--num-prompts", "2", "--turns", "2",
                 "--json", str(decode_json))  # fmt: skip
    decode = json.loads(decode_json.read_text().splitlines()[-1])
    run_measured("eval", str(store), "--max-tokens", "256", "--json", str(eval_json))
    report = json.loads(eval_json.read_text())
    return {
        "shape": name,
        "params_b": round(file_gb * 2**30 / BF16_BYTES / 1e9, 2),
        "file_gb": file_gb,
        "build_s": build_s,
        "resumed_layers": resumed,
        "build_peak_gb": build_peak,
        "serve_gb": serve_gb,
        "k": k,
        "exact_tps": decode["exact_tokens_per_s"],
        "approx_tps": decode["approx_tokens_per_s"],
        "approx_speedup": decode["approx_speedup"],
        "exact_mb_per_token": shape.mlp_bytes_per_token() / 2**20,
        "approx_mb_per_token": approx_bytes_per_token(report, shape.hidden) / 2**20,
    }


def build_time(row: dict, layers: int) -> str:
    """The build's wall seconds, saying so when it resumed layers a stopped build had finished."""
    if row["resumed_layers"] == 0:
        return f"{row['build_s']:.0f}"
    return f"{row['build_s']:.0f} (resumed: {row['resumed_layers']} of {layers} layers built before)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["small"])
    parser.add_argument("--work", type=Path, default=REPO / "results" / "scale", help="checkpoints and stores")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument(
        "--write",
        action="store_true",
        help=f"rewrite {PAGE.relative_to(REPO)} ({PAGE_7B.relative_to(REPO)} for the 7b shape, which runs alone)",
    )
    args = parser.parse_args()
    if args.write and "7b" in args.shapes and args.shapes != ["7b"]:
        parser.error("the 7b shape is written to its own page: run it alone (--shapes 7b)")
    page = PAGE_7B if args.shapes == ["7b"] else PAGE
    started_at = commit()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.shapes:
        r = measure(name, SHAPES[name], args.work, args.calib_tokens)
        rows.append(
            f"| {r['shape']} | {r['params_b']:.2f} | {r['file_gb']:.2f} | {build_time(r, SHAPES[name].layers)} | "
            f"{r['build_peak_gb']:.2f} ({r['build_peak_gb'] / r['file_gb']:.2f}×) | "
            f"{r['serve_gb']:.2f} ({r['serve_gb'] / r['file_gb']:.2f}×) | {r['k']} | {r['exact_tps']:.1f} | "
            f"{r['approx_tps']:.1f} | {r['approx_speedup']:.2f}× | {r['exact_mb_per_token']:.0f} | "
            f"{r['approx_mb_per_token']:.0f} |"
        )
        print(rows[-1], flush=True)
    if args.write:
        write_table_page(
            page,
            "Scale: LLaMA-shaped bfloat16 checkpoints" + (" at LLaMA-2-7B's shape" if page == PAGE_7B else ""),
            started_at,
            "Randomly initialised LLaMA-shaped checkpoints in bfloat16 (`save_pretrained`), served in "
            "their dtype. Build: `ann-mlp build` at k = d_ff/16, target recall 0.9, "
            f"{args.calib_tokens} calibration tokens, planned as by default, in its own process (peak "
            "resident memory from ru_maxrss; a build that resumed a stopped one's finished layers is timed for "
            "what it did: loading them, the rest, planning and writing). Serve: a real `ann-mlp serve`, resident memory once ready "
            "(Python, torch and the server included). Decode: `ann-mlp bench decode`, batch 1, "
            "16 new tokens, exact and approximate in the same turns. MB/token: the MLP bytes one "
            "token reads, exact (every MLP weight) and approximate (the index's bytes as "
            "`ann-mlp eval` counts them, plus the k kept up and value rows). Random weights have no "
            "activation sparsity: decode and bytes are cost only, not the method's recall.",
            [
                "shape", "params (B)", "file GB", "build s", "build peak GB", "serve GB", "k", "exact tok/s",
                "approx tok/s", "approx vs exact", "exact MB/token", "approx MB/token",
            ],
            rows,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
