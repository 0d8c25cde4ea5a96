"""The `ann-mlp` command line: thin verbs over the library."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

import typer

from ann_mlp.config import (
    DEFAULT_BACKEND,
    DEFAULT_BUILD_PARAMS,
    DEFAULT_K,
    DEFAULT_MASS_TARGET,
    DEFAULT_STORE_ROOT,
    DEFAULT_TARGET_RECALL,
    PRESET_BUILDS,
    BuildConfig,
    EvalConfig,
    SparsifyConfig,
    TextConfig,
)
from ann_mlp.errors import AnnMlpError
from ann_mlp.text import DEFAULT_MIX, HELD_OUT_SOURCE, SOURCES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Approximate-nearest-neighbour MLPs for Transformer checkpoints.",
)


def progress_bars() -> bool:
    return sys.stderr.isatty()


# How text files become passages: the same options wherever a command reads text (TextConfig).
SPLIT = typer.Option(
    TextConfig.split,
    "--split",
    help="How a text file becomes passages: paragraphs (blank-line "
    "separated), lines (one per line), or auto (lines when the file has no blank line).",
)
JSONL_FIELD = typer.Option(
    None,
    "--jsonl-field",
    help="JSON Lines: the field holding each record's text (.jsonl and .ndjson files are read as JSON Lines) [text].",
)
LONG_PASSAGES = typer.Option(
    TextConfig.long_passages,
    "--long-passages",
    help="A passage over --passage-tokens: split into windows (every token measured) or cut to the first.",
)
PASSAGE_TOKENS = typer.Option(
    TextConfig.max_seq_len, "--passage-tokens", help="Tokens per sequence run (fewer if the model has fewer positions)."
)


def _text(max_tokens: int, split: str, jsonl_field: str | None, long_passages: str, passage_tokens: int) -> TextConfig:
    return TextConfig(
        max_tokens=max_tokens,
        max_seq_len=passage_tokens,
        split=split,
        jsonl_field=jsonl_field,
        long_passages=long_passages,
    )


def _parse_params(pairs: list[str]) -> dict:
    """NAME=VALUE pairs; values parsed as JSON when they can be (numbers, booleans)."""
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise AnnMlpError(f"expected NAME=VALUE, got {pair!r}")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return params


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not progress_bars():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


@app.command()
def build(
    checkpoint: str = typer.Argument(
        ...,
        help="Model folder (safetensors), .gguf file, or built-in name (minilm, smollm2, relu-lm, topk-lm, minilm-sparse, wide-lm).",
    ),
    out: Path | None = typer.Option(None, help="Store folder [default: indexes/<checkpoint name>]."),
    backend: str = typer.Option(
        DEFAULT_BACKEND, help="exact | ivf | hnsw | pq | scann | cells | lowrank | dejavu | teal"
    ),
    k: int | None = typer.Option(
        None,
        help=f"Keys retrieved per token, every layer [default: per layer: for sparse activations (ReLU, Top-k) "
        f"the smallest k keeping --mass-target of the activation mass, for dense ones {DEFAULT_K}].",
    ),
    target_recall: float = typer.Option(
        DEFAULT_TARGET_RECALL, help="Tune each layer's search effort to this recall@k; 0 to skip tuning."
    ),
    mass_target: float = typer.Option(
        DEFAULT_MASS_TARGET, help="Without --k: the share of a sparse layer's activation mass its k keeps."
    ),
    calib_text: list[str] = typer.Option(
        [],
        help="Calibration text, repeatable, mixed in turn: a file, a folder of .txt/.rst/.md files, or a named "
        f"source ({', '.join(SOURCES)}; their calibration split) [default: {' + '.join(DEFAULT_MIX)}].",
    ),
    calib_tokens: int = typer.Option(TextConfig.max_tokens, help="Calibration tokens to run through the model."),
    check_text: str = typer.Option(
        BuildConfig.check_text,
        help="A kind of text other than the calibration's (file, folder or named source) on which build-time "
        "recall is reported too; 'none' to skip.",
    ),
    split: str = SPLIT,
    jsonl_field: str | None = JSONL_FIELD,
    long_passages: str = LONG_PASSAGES,
    passage_tokens: int = PASSAGE_TOKENS,
    param: list[str] = typer.Option(
        [],
        "--param",
        help="Backend build parameter NAME=VALUE (repeatable), over the backend's defaults "
        f"({'; '.join(f'{b}: ' + ', '.join(f'{n}={v}' for n, v in p.items()) for b, p in DEFAULT_BUILD_PARAMS.items())}).",
    ),
    plan: bool = typer.Option(True, help="Time dense vs approximate per layer and batch size for serving mode auto."),
    tail_correction: bool | None = typer.Option(
        None,
        "--tail-correction/--no-tail-correction",
        help="Stand in for the neurons not retrieved with their mean activation on the calibration tokens that leave them out of the top k [default: for non-gated activations whose dropped neurons are not zero, e.g. GELU].",
    ),
    tail_map_rank: int | None = typer.Option(
        None,
        help="Rank of a linear map of the input fit by least squares to what the approximate MLP leaves out, kept per layer where it lowers the held-out error; 0 for none [default: 16, none for Top-k and thresholded activations].",
    ),
    gated_selection: bool = typer.Option(
        True,
        help="Gated layers: retrieve more candidates than k by gate score (how many is tuned per layer) and keep the k largest |act(gate)*up|, estimated from 8-bit codes of the up rows (a bfloat16/float16 model: its own up rows).",
    ),
    preset: bool = typer.Option(
        False,
        help=f"Use the tuned settings of a built-in checkpoint ({', '.join(PRESET_BUILDS)}) instead of the options above.",
    ),
    force: bool = typer.Option(False, help="Replace an existing store."),
) -> None:
    """Build one MIPS index per MLP layer of CHECKPOINT into a checksummed store."""
    from ann_mlp.build import build_store

    if target_recall != 0 and not 0 < target_recall <= 1:
        raise AnnMlpError(f"target recall must be in (0, 1], got {target_recall}")
    if preset and checkpoint not in PRESET_BUILDS:
        raise AnnMlpError(f"no preset for {checkpoint!r}; presets exist for {', '.join(PRESET_BUILDS)}")
    config = (
        PRESET_BUILDS[checkpoint]
        if preset
        else BuildConfig(
            backend=backend,
            k=k,
            target_recall=target_recall or None,
            mass_target=mass_target,
            build_params=_parse_params(param),
            plan=plan,
            tail_correction=tail_correction,
            tail_map_rank=tail_map_rank,
            gated_selection=gated_selection,
            calibration=_text(calib_tokens, split, jsonl_field, long_passages, passage_tokens),
            check_text=None if check_text == "none" else check_text,
        )
    )
    out = out or DEFAULT_STORE_ROOT / Path(checkpoint.rstrip("/")).stem
    path = build_store(checkpoint, out, config, calib_text, overwrite=force, progress=progress_bars())
    from ann_mlp.store import Store

    built = Store.open(path)
    manifest = built.manifest
    weights = sum((Path(manifest.source["path"]) / name).stat().st_size for name in manifest.source["weight_files"])
    typer.echo(
        f"built {path}: {manifest.family}, {len(manifest.layers)} layers, backend={manifest.backend}, k={manifest.k}; "
        f"its files add {built.file_bytes() / 2**20:.1f} MB to the checkpoint's {weights / 2**20:.1f} MB "
        f"({built.file_bytes() / weights:.1%})"
    )
    check_text = manifest.calibration.get("check_text")
    for entry in manifest.layers:
        ranking = "gate " if entry.gated else ""  # gated layers are searched by their gate rows
        check = f" (on {check_text}: {entry.check_recall:.3f})" if entry.check_recall is not None else ""
        typer.echo(
            f"  layer {entry.layer:>3}: {entry.search_params} {ranking}recall@{entry.k or manifest.k}"
            f"={entry.build_recall:.3f}{check} "
            f"scanned={entry.build_scanned_fraction:.3f} ({entry.build_seconds:.1f}s){_plan_words(entry.plan)}"
        )


def _plan_words(plan: dict | None) -> str:
    """What mode auto will do with a layer, and the one-token timing behind it."""
    if plan is None:
        return ""
    decode = (
        f" (one-token call in decoding: {plan['decode_approx_us']:.0f} us approximate vs "
        f"{plan['decode_dense_us']:.0f} us dense)"
        if "decode_dense_us" in plan
        else ""
    )
    if plan["approx_up_to"] == 0:
        return f"; auto serves it dense: search does not pay at any batch size{decode}"
    return f"; auto approximates calls of up to {plan['approx_up_to']} tokens{decode}"


@app.command("eval")
def evaluate(
    store: Path = typer.Argument(..., help="Index store folder written by `ann-mlp build`."),
    text: str | None = typer.Option(
        None,
        help=f"Text file or folder, or a named source ({', '.join(SOURCES)}; its evaluation split) "
        "[default: held-out Python standard library docstrings].",
    ),
    shift_text: str | None = typer.Option(
        None,
        help="A second text, of another kind (file, folder or named source): the store is evaluated on "
        "it too, and the change from --text to it printed per layer and end to end (the JSON holds it "
        "under extra.text_shift).",
    ),
    k: int | None = typer.Option(None, help="Keys retrieved per token [default: the store's k]."),
    backend: str | None = typer.Option(
        None, help="Evaluate another backend, built in memory and tuned like the store."
    ),
    effort: int | None = typer.Option(
        None,
        help="Search effort for every layer, the store's effort_param (nprobe, efSearch, rerank, margin, ...) [default: tuned].",
    ),
    candidate_factor: float | None = typer.Option(
        None,
        help="Retrieve this many times k by key score and keep the k "
        "largest |contributions| (gated: |act(gate)*up|) [default: "
        "as built, 1 but for gated layers].",
    ),
    max_tokens: int = typer.Option(
        EvalConfig().text.max_tokens,
        help="Evaluation tokens: the run stops after the batch that reaches them, or at the end of the text.",
    ),
    split: str = SPLIT,
    jsonl_field: str | None = JSONL_FIELD,
    long_passages: str = LONG_PASSAGES,
    passage_tokens: int = PASSAGE_TOKENS,
    checkpoint: str | None = typer.Option(None, help="Where the store's checkpoint is now, if it moved."),
    reference: str | None = typer.Option(
        None, help="Also compare both with this checkpoint end to end (e.g. the original of a sparsified model)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),
    plots: Path | None = typer.Option(None, help="Write PNG plots into this folder."),
) -> None:
    """Run exact and approximate model on real text; report recall and fidelity per layer and end to end."""
    from ann_mlp.approx_model import ApproxModel
    from ann_mlp.evaluate import evaluate as run_eval
    from ann_mlp.report import shift_table, table, write_json, write_plots

    model = ApproxModel.open(store, checkpoint)
    if backend is not None:
        model = _rebuilt(model, backend)
    search = {} if effort is None else {model.manifest.layers[0].effort_param: effort}
    config = EvalConfig(
        k=k,
        search_params=search,
        candidate_factor=candidate_factor,
        text=_text(max_tokens, split, jsonl_field, long_passages, passage_tokens),
    )
    from ann_mlp.checkpoint import load_checkpoint

    reference_checkpoint = load_checkpoint(reference) if reference is not None else None
    report = run_eval(model, config, text, progress=progress_bars(), reference=reference_checkpoint)
    typer.echo(table(report))
    if shift_text is not None:
        shifted = run_eval(model, config, shift_text, progress=progress_bars(), reference=reference_checkpoint)
        typer.echo("")
        typer.echo(table(shifted))
        typer.echo("")
        typer.echo(shift_table(report, shifted))
        report.extra["text_shift"] = shifted.to_json()
    if json_out:
        write_json(report, json_out)
    if plots:
        for path in write_plots(report, plots):
            typer.echo(f"plot: {path}")


def _rebuilt(model, backend: str):
    """The same checkpoint with indexes of another backend, built and tuned as the store was."""
    from ann_mlp.approx_model import ApproxModel
    from ann_mlp.build import build_indexes

    manifest = model.manifest
    # The store's own settings (another backend gets its default build parameters); eval
    # approximates every layer, so no plan is measured.
    recorded = BuildConfig.from_json(manifest.build)
    config = replace(
        recorded, backend=backend, plan=False, build_params=recorded.build_params if backend == manifest.backend else {}
    )
    sources = manifest.calibration["sources"]
    new_manifest, indexes, arrays = build_indexes(
        model.checkpoint, config, sources, progress_bars(), name=manifest.name
    )
    return ApproxModel(new_manifest, model.checkpoint, indexes, layer_arrays=arrays)


@app.command()
def sparsity(
    checkpoint: str = typer.Argument(..., help="Model folder, .gguf file, or built-in name."),
    text: Path | None = typer.Option(
        None, help="Text file or folder [default: held-out Python standard library docstrings]."
    ),
    max_tokens: int = typer.Option(EvalConfig().text.max_tokens, help="Tokens to run."),
    split: str = SPLIT,
    jsonl_field: str | None = JSONL_FIELD,
    long_passages: str = LONG_PASSAGES,
    passage_tokens: int = PASSAGE_TOKENS,
    json_out: Path | None = typer.Option(None, "--json", help="Write the report as JSON."),
    plots: Path | None = typer.Option(None, help="Write PNG plots into this folder."),
) -> None:
    """Per layer: share of MLP neurons firing per token, its percentiles, firing frequencies, dead neurons."""
    from ann_mlp.checkpoint import load_checkpoint
    from ann_mlp.sparsity import measure_sparsity, sparsity_plots, sparsity_table

    report = measure_sparsity(
        load_checkpoint(checkpoint),
        text,
        _text(max_tokens, split, jsonl_field, long_passages, passage_tokens),
        progress_bars(),
    )
    typer.echo(sparsity_table(report))
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    if plots:
        for path in sparsity_plots(report, plots):
            typer.echo(f"plot: {path}")


@app.command()
def sparsify(
    checkpoint: str = typer.Argument(..., help="Model folder, .gguf file, or built-in name."),
    out: Path = typer.Option(..., help="Folder for the sparsified Hugging Face checkpoint."),
    method: str = typer.Option(SparsifyConfig.method, help="topk | relu | fatrelu"),
    k: int | None = typer.Option(None, help="topk: neurons kept per token [d_ff / 16]."),
    threshold: float = typer.Option(
        SparsifyConfig.threshold, help="fatrelu: pre-activations at or below it do not fire."
    ),
    l1: float = typer.Option(SparsifyConfig.l1, help="Weight of an L1 push on the activations."),
    text: list[str] = typer.Option(
        [],
        help="Training text, repeatable, mixed in turn: a file, a folder, or a named source "
        f"({', '.join(SOURCES)}); training takes three passages in four, the report the rest "
        f"[default: {' + '.join(DEFAULT_MIX)}].",
    ),
    held_out_text: str | None = typer.Option(
        None,
        help="A kind of text left out of training, reported beside the in-domain figures: a file, "
        f"a folder or a named source [default: {HELD_OUT_SOURCE}, when training did not use it].",
    ),
    split: str = SPLIT,
    jsonl_field: str | None = JSONL_FIELD,
    minutes: float | None = typer.Option(
        None, help="Training budget in minutes for the whole run, resumes included [60 unless --steps]."
    ),
    steps: int | None = typer.Option(None, help="Training budget in steps for the whole run."),
    lr: float = typer.Option(SparsifyConfig.lr, help="Peak learning rate."),
    dtype: str = typer.Option(SparsifyConfig.dtype, help="float32 | float16 | bfloat16 for the written weights."),
    seed: int = typer.Option(SparsifyConfig.seed),
    resume: bool = typer.Option(False, help="Continue the run saved in OUT.partial."),
    force: bool = typer.Option(False, help="Start over, replacing OUT."),
) -> None:
    """Replace the MLP activation with a sparse one and distil against the original on real text."""
    from ann_mlp.sparsify import report_table
    from ann_mlp.sparsify import sparsify as run_sparsify

    if minutes is None and steps is None:
        minutes = SparsifyConfig.minutes
    read = {"split": split, "jsonl_field": jsonl_field}
    config = SparsifyConfig(
        method=method,
        k=k,
        threshold=threshold,
        l1=l1,
        minutes=minutes,
        steps=steps,
        lr=lr,
        dtype=dtype,
        seed=seed,
        text=replace(SparsifyConfig.text, **read),
        report_text=replace(SparsifyConfig.report_text, **read),
    )
    report = run_sparsify(checkpoint, out, config, text, held_out_text, resume, force, progress_bars())
    typer.echo(report_table(report))
    typer.echo(f"wrote {out}")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: speed of approximate vs dense MLPs.")
app.add_typer(bench_app, name="bench")


@bench_app.command("layer")
def bench_layer(
    d_model: int = typer.Option(..., help="Model width."),
    d_ff: int = typer.Option(..., help="MLP width."),
    gated: bool = typer.Option(False, help="Gated (SwiGLU) MLP."),
    batch: list[int] = typer.Option([1], help="Batch sizes (repeatable)."),
    backend: str = typer.Option(
        "ivf", help="MIPS backend (the targets are for IVF probing --probe-fraction of its lists)."
    ),
    probe_fraction: float = typer.Option(1 / 16, help="Search effort as a share of its range (IVF: lists probed)."),
    k: int = typer.Option(DEFAULT_K, help="Keys retrieved per token."),
    repeats: int = typer.Option(30, min=30, help="Timed calls per path, after warm-up."),
    json_out: Path = typer.Option(Path("results/bench_layer.jsonl"), "--json", help="Append JSON lines here."),
) -> None:
    """One MLP layer with random weights: dense (best of torch and numpy) vs approximate, same process."""
    from ann_mlp.benchmark import bench_layer as run
    from ann_mlp.benchmark import streaming_bandwidth_gb_s

    if min(d_model, d_ff, *batch) < 1:
        raise AnnMlpError(f"d_model, d_ff and batch sizes must be positive, got {d_model}, {d_ff}, {batch}")
    if not 0 < probe_fraction <= 1:
        raise AnnMlpError(f"probe fraction must be in (0, 1], got {probe_fraction}")
    if not 1 <= k <= d_ff:
        raise AnnMlpError(f"k must be in [1, d_ff={d_ff}], got {k}")
    typer.echo("random weights: timing only (recall on random weights means nothing)")
    bandwidth = streaming_bandwidth_gb_s()
    typer.echo(f"streaming memory bandwidth (array copy): {bandwidth:.1f} GB/s")
    typer.echo(
        f"{'shape':>14} {'gated':>5} {'batch':>5} {'backend':>7} {'dense':>6} {'dense us':>10} "
        f"{'approx us':>10} {'speedup':>8} {'bytes read':>10} {'limit':>6} {'dense GB/s':>10} "
        f"{'search us':>9} {'sum us':>7} {'up us':>6} {'overhead us':>11}"
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    for result in run(d_model, d_ff, batch, gated, backend, probe_fraction, k, repeats):
        typer.echo(
            f"{f'{d_model}x{d_ff}':>14} {gated!s:>5} {result.batch:>5} {backend:>7} {result.dense_path:>6} "
            f"{result.dense_us:>10.1f} {result.approx_us:>10.1f} {result.speedup:>8.2f} "
            f"{result.bytes_read_fraction:>10.4f} {result.traffic_limit_speedup:>6.1f} {result.dense_gb_s:>10.1f} "
            f"{result.search_us:>9.1f} {result.value_sum_us:>7.1f} {result.up_rows_us:>6.1f} "
            f"{result.overhead_us:>11.1f}"
        )
        with open(json_out, "a") as f:
            f.write(json.dumps(result.to_json() | {"bandwidth_gb_s": bandwidth}) + "\n")


@bench_app.command("e2e")
def bench_e2e(
    store: Path = typer.Argument(..., help="Index store folder."),
    text: Path | None = typer.Option(None, help="Text file [default: held-out Python standard library docstrings]."),
    batch: list[int] = typer.Option([1, 16], help="Sequences per forward call (repeatable)."),
    max_tokens: int = typer.Option(4096, help="Real tokens per pass."),
    repeats: int = typer.Option(
        4,
        min=1,
        help="Timed passes per path, after one warm-up pass (an even number: the turn order reverses every other pass).",
    ),
    json_out: Path = typer.Option(Path("results/bench_e2e.jsonl"), "--json", help="Append JSON lines here."),
) -> None:
    """A real checkpoint end to end: exact vs approximate vs planned (auto) tokens/s, with fidelity."""
    from ann_mlp.approx_model import ApproxModel
    from ann_mlp.benchmark import bench_e2e as run

    model = ApproxModel.open(store)
    typer.echo(
        f"{'model':>12} {'batch':>5} {'tokens':>6} {'exact tok/s':>11} {'approx tok/s':>12} "
        f"{'auto tok/s':>10} {'auto/exact':>10} {'auto dense':>10} {'recall':>6} {'scanned':>7}  end to end"
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    for size in batch:
        result = run(model, size, text, max_tokens, repeats)
        e2e = ", ".join(f"{name} {value:.4g}" for name, value in result.end_to_end.items())
        typer.echo(
            f"{result.model:>12} {size:>5} {result.tokens:>6} {result.exact_tokens_per_s:>11.1f} "
            f"{result.approx_tokens_per_s:>12.1f} {result.auto_tokens_per_s:>10.1f} {result.auto_speedup:>10.3f} "
            f"{result.auto_dense_fraction:>10.3f} {result.recall_at_k:>6.3f} {result.scanned_fraction:>7.3f}  {e2e}"
        )
        with open(json_out, "a") as f:
            f.write(json.dumps(result.to_json()) + "\n")


@bench_app.command("decode")
def bench_decode(
    store: Path = typer.Argument(..., help="Index store folder of a causal LM."),
    prompts_file: Path | None = typer.Option(
        None,
        "--prompts",
        help="Prompts: a text file, one per paragraph, or "
        "per line in a file with no blank line [default: held-out standard "
        "library docstrings].",
    ),
    new_tokens: int = typer.Option(64, help="Tokens generated per sequence (no end-of-sequence stop)."),
    batch: int = typer.Option(1, help="Sequences decoded together."),
    prompts: int = typer.Option(8, "--num-prompts", help="Prompts taken from the text."),
    prompt_tokens: int = typer.Option(32, help="Each prompt cut to at most this many tokens."),
    turns: int = typer.Option(
        4, help="Timed turns per mode, after one warm-up turn (the order reverses every other turn)."
    ),
    json_out: Path = typer.Option(Path("results/bench_decode.jsonl"), "--json", help="Append JSON lines here."),
    llama_cpp: bool = typer.Option(
        False,
        "--llama-cpp",
        help="Also time llama.cpp (llama-cpp-python, the llama-cpp extra) on the store's GGUF file in the same "
        "turns (batch 1).",
    ),
) -> None:
    """Generation with a KV cache, one new token per step: exact vs approx vs auto tokens/s, with fidelity."""
    from ann_mlp.approx_model import ApproxModel
    from ann_mlp.decode_bench import bench_decode as run
    from ann_mlp.planner import replan_if_moved

    model = ApproxModel.open(store)
    replan_if_moved(model)
    result = run(model, prompts_file, new_tokens, batch, prompts, prompt_tokens, turns, llama_cpp)
    typer.echo(
        f"{result.model}: batch {result.batch}, {result.prompts} prompts of <= {result.prompt_tokens} tokens, "
        f"{result.new_tokens} new tokens each, {result.turns} turns ({result.text})"
    )
    typer.echo(
        f"{'path':>10} {'tok/s':>8} {'vs exact':>8} {'agreement':>9}  per step: {'total':>7} {'search':>7} "
        f"{'mlp rest':>8} {'attention':>9} {'other':>7} ms"
    )
    rows = (
        ("exact", result.exact_tokens_per_s, 1.0, 1.0),
        ("approx", result.approx_tokens_per_s, result.approx_speedup, result.continuation_agreement),
        ("auto", result.auto_tokens_per_s, result.auto_speedup, result.auto_continuation_agreement),
    )
    for name, rate, speedup, agree in rows:
        s = result.split[name]
        typer.echo(
            f"{name:>10} {rate:>8.1f} {speedup:>8.3f} {agree:>9.3f}  {'':>10}{s.total_ms:>7.3f} "
            f"{s.index_search_ms:>7.3f} {s.mlp_rest_ms:>8.3f} {s.attention_ms:>9.3f} {s.other_ms:>7.3f}"
        )
    typer.echo(
        f"{'generate()':>10} {result.generate_tokens_per_s:>8.1f} "
        f"{1 / result.lean_loop_speedup:>8.3f}   (transformers' loop, exact)"
    )
    if result.llama_cpp_tokens_per_s is not None:
        typer.echo(
            f"{'llama.cpp':>10} {result.llama_cpp_tokens_per_s:>8.1f} {result.llama_cpp_vs_exact:>8.3f}   "
            "(its own kernels on the GGUF file's quantized weights)"
        )
    typer.echo(
        f"KL along the exact continuation {result.kl_mean:.5f}; perplexity on the prompts "
        f"{result.perplexity_exact:.2f} exact, {result.perplexity_approx:.2f} approx; "
        f"auto ran {result.auto_dense_fraction:.1%} of its MLP calls dense"
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    with open(json_out, "a") as f:
        f.write(json.dumps(result.to_json()) + "\n")


@bench_app.command("memory")
def bench_memory(
    store: Path = typer.Argument(..., help="Index store folder."),
    repeats: int = typer.Option(3, min=1, help="Fresh processes per side; the median is reported."),
    json_out: Path = typer.Option(Path("results/bench_memory.jsonl"), "--json", help="Append JSON lines here."),
) -> None:
    """Resident memory of the model with its indexes vs the model alone, each loaded in a fresh process."""
    from ann_mlp.benchmark import bench_memory as run

    result = run(store, repeats)
    typer.echo(f"{'model':>12} {'backend':>8} {'dense MB':>9} {'approx MB':>9} {'ratio':>6}")
    typer.echo(
        f"{result.model:>12} {result.backend:>8} {result.dense_mb:>9.1f} {result.approx_mb:>9.1f} {result.ratio:>6.3f}"
    )
    json_out.parent.mkdir(parents=True, exist_ok=True)
    with open(json_out, "a") as f:
        f.write(json.dumps(result.to_json()) + "\n")


@app.command()
def info(store: Path = typer.Argument(..., help="Index store folder.")) -> None:
    """Verify a store's checksums and print its manifest."""
    from ann_mlp.store import Store

    typer.echo(json.dumps(Store.open(store).manifest.to_json(), indent=2))


def main() -> None:
    try:
        app()
    except AnnMlpError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
