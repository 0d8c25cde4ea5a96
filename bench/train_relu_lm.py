"""Train a small decoder-only ReLU LM (OPT architecture) on the Linux kernel documentation.

Reproducible (seeded), resumable across runs, and logging what "Large Models
are Parsimonious Learners" (Li et al. 2022) plots in its Fig. 1: the share of
non-zero MLP activations per layer on held-out text, against training steps.

    python bench/train_relu_lm.py --name relu-lm --minutes 100     # trains or resumes
    python bench/train_relu_lm.py --name relu-lm --finish          # writes bench/models/relu-lm

Training state (fp32 weights, AdamW moments, RNG, data cursor) lives in
--state-dir, outside the work tree, as safetensors + JSON: nothing is pickled.
The finished model is a Hugging Face folder (fp16 safetensors, config,
tokenizer, training log and curve) that `ann-mlp` loads as an OPT checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ann_mlp.activations import SparseActivation
from ann_mlp.atomic import atomic_folder
from ann_mlp.training_state import load_state, save_state

REPO = Path(__file__).resolve().parent.parent
CORPUS_PACKAGE = "linux-doc-6.1"
SOURCES = "usr/share/doc/linux-doc-6.1/html/_sources"
SPECIALS = ["<pad>", "</s>", "<unk>"]
# What a run is: on resume these come from the saved state, whatever the command line says
# (--steps may grow: it extends the schedule).
RUN_ARGS = ("layers", "d_model", "d_ff", "heads", "vocab", "seq_len", "batch", "lr", "warmup", "topk", "seed")


# -- corpus -------------------------------------------------------------------
def fetch_corpus(cache: Path) -> Path:
    """The reST sources of Debian's linux-doc package (without translations/), extracted once."""
    root = cache / "linux-doc"
    if (root / SOURCES).is_dir():
        return root / SOURCES
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(["apt-get", "download", CORPUS_PACKAGE], cwd=tmp, check=True)
        deb = next(Path(tmp).glob(f"{CORPUS_PACKAGE}_*.deb"))
        staging = Path(tmp) / "x"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        staging.rename(root)
    return root / SOURCES


def split_files(sources: Path) -> tuple[list[Path], list[Path]]:
    """(train, held-out): one file in 20 held out, chosen by a hash of its path."""
    files = sorted(p for p in sources.rglob("*.txt") if "translations" not in p.relative_to(sources).parts)
    held = [p for p in files if hashlib.sha1(str(p.relative_to(sources)).encode()).digest()[0] % 20 == 0]
    if not held or len(held) == len(files):
        raise SystemExit(f"error: {sources} has too few files ({len(files)}) to hold some out by file")
    held_set = set(held)
    return [p for p in files if p not in held_set], held


def read(files: list[Path]) -> list[str]:
    return [p.read_text(encoding="utf-8", errors="replace") for p in files]


# -- tokenizer ------------------------------------------------------------------
def train_tokenizer(texts: list[str], vocab_size: int) -> transformers.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>"
    )


def encode(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts as one stream of token ids, documents separated by </s>."""
    eos = tokenizer.eos_token_id
    ids = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(encoded)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int32)


# -- model ----------------------------------------------------------------------
def make_model(args, vocab_size: int) -> transformers.OPTForCausalLM:
    config = transformers.OPTConfig(
        vocab_size=vocab_size,
        hidden_size=args.d_model,
        ffn_dim=args.d_ff,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        max_position_embeddings=args.seq_len,
        word_embed_proj_dim=args.d_model,
        do_layer_norm_before=True,
        activation_function="relu",
        dropout=0.0,
        attention_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
    )
    torch.manual_seed(args.seed)
    return transformers.OPTForCausalLM(config)


def set_activation(model, topk: int | None) -> None:
    """Top-k Transformer: the same module ann-mlp installs when it loads the finished checkpoint."""
    if topk:
        for layer in model.model.decoder.layers:
            layer.activation_fn = SparseActivation("relu", topk=topk)


# -- evaluation -------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, held_ids: np.ndarray, args) -> dict:
    """Held-out loss, next-token accuracy and per-layer % of non-zero MLP activations."""
    model.eval()
    n = args.eval_windows
    starts = np.linspace(0, len(held_ids) - args.seq_len - 1, n).astype(np.int64)
    batch = torch.from_numpy(np.stack([held_ids[s : s + args.seq_len] for s in starts]).astype(np.int64))
    nonzero = {}
    hooks = []
    for i, layer in enumerate(model.model.decoder.layers):

        def hook(_m, _inp, out, i=i):
            nonzero[i] = float((out > 0).float().mean()) * 100

        hooks.append(layer.activation_fn.register_forward_hook(hook))
    out = model(input_ids=batch, labels=batch)
    for h in hooks:
        h.remove()
    pred = out.logits[:, :-1].argmax(-1)
    accuracy = float((pred == batch[:, 1:]).float().mean())
    model.train()
    return {
        "loss": float(out.loss),
        "accuracy": accuracy,
        "nonzero_pct": [round(nonzero[i], 3) for i in range(len(nonzero))],
    }


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def plot_curve(log: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = [r for r in log if "nonzero_pct" in r]
    if not evals:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for layer in range(len(evals[0]["nonzero_pct"])):
        ax.plot([r["step"] for r in evals], [r["nonzero_pct"][layer] for r in evals], label=f"layer {layer}")
    ax.set_xlabel("training step")
    ax.set_ylabel("non-zero MLP activations on held-out text (%)")
    ax.set_title(title)
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="relu-lm")
    p.add_argument("--topk", type=int, default=0, help="Top-k on the activations (0: plain ReLU)")
    p.add_argument("--out", type=Path, default=None, help="finished model folder [bench/models/NAME]")
    p.add_argument("--state-dir", type=Path, default=None, help="[~/.cache/ann-mlp/train/NAME]")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "ann-mlp")
    p.add_argument(
        "--sources",
        type=Path,
        default=None,
        help="folder of .txt files to train on instead of Debian's linux-doc reST sources",
    )
    p.add_argument("--minutes", type=float, default=60.0, help="train for this long in this run, then save")
    p.add_argument("--finish", action="store_true", help="write the Hugging Face folder from the current state")
    p.add_argument("--force", action="store_true", help="overwrite a finished model folder")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6000, help="planned steps (cosine schedule length)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or REPO / "bench" / "models" / args.name
    state_dir = args.state_dir or args.cache / "train" / args.name
    if (out / "config.json").exists() and not args.force:
        print(f"error: {out} holds a finished model; pass --force to overwrite it", file=sys.stderr)
        return 1
    if (state_dir / "meta.json").exists():
        saved = json.loads((state_dir / "meta.json").read_text())["args"]
        changed = {name: saved[name] for name in RUN_ARGS if getattr(args, name) != saved[name]}
        if changed:
            print(f"resuming with the saved run's settings: {changed}")
            for name, value in changed.items():
                setattr(args, name, value)
    torch.set_num_threads(args.threads)
    sources = args.sources or fetch_corpus(args.cache)
    train_files, held_files = split_files(sources)

    # Shared by every model of the same vocabulary size (relu-lm and topk-lm see the same tokens).
    tokenizer_dir = args.cache / f"tokenizer-bpe{args.vocab}"
    if not (tokenizer_dir / "tokenizer.json").exists():
        train_tokenizer(read(train_files), args.vocab).save_pretrained(tokenizer_dir)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    ids_path = tokenizer_dir / "train_ids.npy"
    held_path = tokenizer_dir / "held_ids.npy"
    if not ids_path.exists():
        np.save(ids_path, encode(tokenizer, read(train_files)), allow_pickle=False)
        np.save(held_path, encode(tokenizer, read(held_files)), allow_pickle=False)
    train_ids = np.load(ids_path, allow_pickle=False)
    held_ids = np.load(held_path, allow_pickle=False)

    model = make_model(args, len(tokenizer))
    set_activation(model, args.topk)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    meta = {
        "step": 0,
        "tokens_seen": 0,
        "train_seconds": 0.0,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"out": str(out)},
        "corpus": {
            "package": CORPUS_PACKAGE,
            "train_files": len(train_files),
            "held_files": len(held_files),
            "train_tokens": int(len(train_ids)),
            "held_tokens": int(len(held_ids)),
        },
    }
    state_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = state_dir.with_name(args.name + ".log.jsonl")
    if (state_dir / "meta.json").exists():
        meta = load_state(state_dir, model, optimizer)
        print(f"resumed {args.name} at step {meta['step']} ({meta['train_seconds'] / 3600:.2f} h trained)")
    log = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() else []

    if not args.finish:
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + meta["step"])
        model.train()
        deadline = time.monotonic() + args.minutes * 60
        while time.monotonic() < deadline and meta["step"] < args.steps:
            start, start_cpu = time.perf_counter(), time.process_time()
            step = meta["step"]
            offsets = torch.randint(0, len(train_ids) - args.seq_len - 1, (args.batch,), generator=generator)
            batch = torch.from_numpy(
                np.stack([train_ids[o : o + args.seq_len] for o in offsets.tolist()]).astype(np.int64)
            )
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args)
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            meta["step"] = step + 1
            meta["tokens_seen"] += batch.numel()
            # Step time, not pauses: a run stopped (SIGSTOP) so that a benchmark has the machine uses no
            # CPU meanwhile, so the smaller of wall and CPU time leaves the pause out on one thread.
            meta["train_seconds"] += min(time.perf_counter() - start, time.process_time() - start_cpu)
            if meta["step"] % args.eval_every == 0 or meta["step"] == args.steps:
                record = {
                    "step": meta["step"],
                    "tokens_seen": meta["tokens_seen"],
                    "train_hours": round(meta["train_seconds"] / 3600, 4),
                    "train_loss": round(loss.item(), 4),
                    **evaluate(model, held_ids, args),
                }
                log.append(record)
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
                save_state(state_dir, model, optimizer, meta)
        save_state(state_dir, model, optimizer, meta)
        plot_curve(log, state_dir.with_name(args.name + ".curve.png"), f"{args.name}: non-zero % per layer")
        return 0

    # --finish: the Hugging Face folder, fp16, with its log and curve
    with atomic_folder(out) as tmp:
        # Stock OPT has no Top-k: record it in the config, where ann-mlp's loader finds it.
        model.config.ann_mlp_topk = args.topk or None
        # Shards of at most 45 MB: each stays a small file in git.
        model.half().save_pretrained(tmp, max_shard_size="45MB")
        tokenizer.save_pretrained(tmp)
        shutil.copy(log_path, tmp / "train_log.jsonl")
        plot_curve(log, tmp / "sparsity_curve.png", f"{args.name}: non-zero % per layer on held-out text")
        (tmp / "training.json").write_text(json.dumps(meta, indent=2, default=str))
    print(f"wrote {out}: step {meta['step']}, {meta['tokens_seen']} tokens, {meta['train_seconds'] / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
