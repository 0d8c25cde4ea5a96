"""`ann-mlp build`: checkpoint -> calibration hidden states -> one tuned index per layer -> store."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ann_mlp import __version__
from ann_mlp.activations import activation_module
from ann_mlp.approx_mlp import ApproxMLP, augmented_keys, augmented_queries, dense_activations, values_output
from ann_mlp.approx_model import ApproxModel, share_model_tables
from ann_mlp.capture import Batch, LayerByLayer, TextStats, batches
from ann_mlp.checkpoint import (
    Checkpoint,
    CheckpointSource,
    MlpWeights,
    load_checkpoint,
    resolve_checkpoint,
    return_free_heap,
)
from ann_mlp.config import (
    DEFAULT_BUILD_PARAMS,
    DEFAULT_BUILD_PARAMS_NARROW_ROWS,
    DEFAULT_K,
    STORE_FORMAT_VERSION,
    BuildConfig,
    TextConfig,
)
from ann_mlp.errors import InputError
from ann_mlp.index import MipsIndex, backend_class, build_index
from ann_mlp.linalg import RowCodes, round_up_16
from ann_mlp.metrics import total_relative_error
from ann_mlp.planner import machine, plan_model
from ann_mlp.store import LAYER_ARRAYS, LayerEntry, Manifest, StoreWriter
from ann_mlp.text import (
    available_sources,
    calibration_passages,
    describe,
    describe_calibration,
    is_named,
    passages,
    recorded_sources,
)
from ann_mlp.tuning import measure, tune_effort

log = logging.getLogger(__name__)
ZERO_TAIL_ACTIVATIONS = frozenset({"relu", "relu2", "relu6"})  # negative scores give exact zeros
MAX_TUNING_QUERIES = 4096


def calibration_batches(
    checkpoint: Checkpoint, text: TextConfig, passage_stream: Iterable[str]
) -> tuple[list[Batch], TextStats]:
    """The batches a build runs (an error if the text is empty), and how much text they hold.
    Token ids only: reading them all up front costs little and fails before any forward pass."""
    stats = TextStats()
    return list(batches(checkpoint, passage_stream, text, stats)), stats


def split_holdout(per_batch: list[torch.Tensor], holdout_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's calibration inputs, per batch (n_b, d_model), split into (tune, holdout) by
    batch (every round(1 / fraction)-th batch is held out); a single batch by its last tokens."""
    every = max(2, round(1 / holdout_fraction))
    holdout = [x for i, x in enumerate(per_batch) if i % every == every - 1]
    if not holdout:
        x = torch.cat(per_batch)
        cut = max(1, int(len(x) * (1 - holdout_fraction)))
        return x[:cut], x[cut:]
    return torch.cat([x for i, x in enumerate(per_batch) if i % every != every - 1]), torch.cat(holdout)


def capture_calibration(
    checkpoint: Checkpoint, config: BuildConfig, sources: Sequence[str | Path]
) -> tuple[list[torch.Tensor], list[torch.Tensor], TextStats]:
    """Every layer's calibration inputs at once, split into (tune, holdout): for measuring peers
    on what a build tunes on. A build itself holds one layer's at a time (`build_indexes`)."""
    calib, stats = calibration_batches(
        checkpoint, config.calibration, calibration_passages(sources, config.calibration)
    )
    stream = LayerByLayer(checkpoint, calib)
    tune, holdout = zip(
        *(split_holdout(stream.next_layer(), config.holdout_fraction) for _ in range(checkpoint.num_layers))
    )
    return list(tune), list(holdout), stats


def check_text_in_use(config: BuildConfig, sources: Sequence[str | Path]) -> str | None:
    """The other kind of text build-time recall is checked on: config.check_text unless the
    calibration uses it, or it is a named source this machine lacks."""
    check = config.check_text
    if check is None or check in [str(source) for source in sources]:
        return None
    if is_named(check) and not available_sources([check], "evaluation"):
        return None
    return check


class LayerCalibration:
    """One layer's calibration inputs and the exact MLP over them, computed once on first use:
    choosing k, the dropped means, the candidates and the tail map all read the same dense pass."""

    def __init__(self, weights: MlpWeights, x: torch.Tensor) -> None:
        self.weights = weights
        self.x = x  # (n, d_model)

    @cached_property
    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, activations), each (n, d_ff): approx_mlp.dense_activations."""
        return dense_activations(self.weights, self.x)

    @cached_property
    def exact(self) -> torch.Tensor:
        """The exact MLP output (n, d_model)."""
        return values_output(self.weights, self.dense[1])


def k_for_mass(calibration: LayerCalibration, mass_target: float, k_max: int) -> int:
    """Smallest k (a multiple of 16, at most k_max) whose exact top-k by score keeps
    `mass_target` of sum |h| on average over the calibration inputs."""
    scores, activations = calibration.dense  # (N, d_ff) each
    order = scores.argsort(dim=1, descending=True)  # retrieval order: by score
    mass = activations.abs().gather(1, order).cumsum(dim=1)  # (N, d_ff)
    captured = (mass / mass[:, -1:].clamp_min(1e-30)).mean(0)  # (d_ff,) mean share kept by the top-(i+1)
    reaching = int(torch.searchsorted(captured, torch.tensor(mass_target)).item()) + 1
    return int(min(k_max, max(16, round_up_16(reaching))))


def _sample(x: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    if len(x) <= limit:
        return x
    generator = torch.Generator().manual_seed(seed)
    return x[torch.randperm(len(x), generator=generator)[:limit]]


def sparse_activation(weights: MlpWeights) -> bool:
    """Whether the layer's activation leaves exact zeros: ReLU-like, Top-k or thresholded."""
    return weights.activation in ZERO_TAIL_ACTIVATIONS or bool(weights.topk) or weights.threshold is not None


def layer_k(config: BuildConfig, weights: MlpWeights, calibration: LayerCalibration) -> int:
    """The layer's k: the one given; else, for a sparse activation, the smallest k keeping
    config.mass_target of its activation mass (at most half of d_ff: beyond, search cannot pay);
    else DEFAULT_K, since every neuron of a dense activation carries some of the output."""
    if config.k is not None:
        return config.k
    if sparse_activation(weights):
        return k_for_mass(calibration, config.mass_target, weights.d_ff // 2)
    return min(DEFAULT_K, weights.d_ff)


def tail_correction_pays(weights: MlpWeights) -> bool:
    """Whether the layer's dropped neurons carry a tail worth standing in for, by default.

    Measured with perfect retrieval: MiniLM (GELU) at k = 192 of 1536, embedding cosine
    0.61 -> 0.93 with it. ReLU-like and Top-k / threshold activations drop exact zeros.
    Gated SmolLM2 at k = 768: it lifts next-token agreement 0.07 -> 0.27 when neurons are
    chosen by gate score, but choosing them by contribution does far better alone (0.87)
    and the correction, fit to the score top-k, then hurts (0.61).
    """
    return not sparse_activation(weights) and not weights.gated


def dropped_mean(calibration: LayerCalibration, k: int) -> torch.Tensor:
    """Per neuron, its mean activation over the calibration tokens whose top-k leaves it out: (d_ff,).

    This is what the tail correction adds for a neuron that is not retrieved. The plain
    mean would also count the tokens where the neuron fires most, exactly those where it
    is retrieved (on MiniLM at k = 192 it raised the MLP error from 0.60 to 1.04).
    """
    scores, activations = calibration.dense  # (n, d_ff) each
    retrieved = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(k, dim=1).indices, True)
    dropped = (~retrieved).float()  # (n, d_ff)
    return (activations * dropped).sum(0) / dropped.sum(0).clamp_min(1)


def default_tail_map_rank(weights: MlpWeights) -> int:
    """16 (at most d_model); 0 for Top-k and thresholded activations, whose dropped neurons are
    exactly zero.

    What the map predicts lies in a few directions. With exact retrieval, rank 8, 16, 32 and 64
    all took relu-lm (k by mass 0.95) from next-token agreement 0.948 to 0.960 and the KL from
    0.009 to 0.003; MiniLM (k = 128, dropped means on) went from embedding cosine 0.895 to
    0.932 / 0.938 / 0.941 at rank 8 / 24 / 64. Its cost grows with the rank: at 4096x16384,
    rank 256 added 0.47 ms to a 0.91 ms batch-1 call. On topk-lm (recall 0.987) a rank-64 map
    could only absorb search misses: agreement 0.958 -> 0.959 for 0.063 -> 0.087 of the key bytes.
    """
    if weights.topk or weights.threshold is not None:
        return 0
    return min(weights.d_model, 16)


def approx_outputs(mlp: ApproxMLP, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """The approximate MLP's outputs over calibration inputs, `chunk` tokens a call: x (n, d_model)
    -> (n, d_model). Each call's (tokens, candidates) temporaries stay small: in one call over
    1500 tokens, a random 0.2 B model's layer held 1 GB of them."""
    with torch.inference_mode():
        return torch.cat([mlp.forward_with_selection(x[start : start + chunk])[0] for start in range(0, len(x), chunk)])


def fit_tail_map(mlp: ApproxMLP, calibration: LayerCalibration, rank: int) -> torch.Tensor:
    """Reduced-rank least squares from [x; 1] to what the approximate MLP leaves out of its output.

    Calibration inputs x (n, d_model) -> (r, D + d_model) float32, row j = [p_j; q_j], the
    correction being sum_j (p_j . [x; 1]) q_j. The residual is that of the MLP as served (its
    index, k and mean tail), so the map also absorbs what search misses on average. Rows are
    weighted by 1 / |exact output|: relative error, so the few tokens with huge outputs (a first
    token's massive activations) do not decide the fit. The rank-r map keeps the r directions of
    the full-rank fit's output that carry most of the fitted residual.
    """
    x = calibration.x
    exact = calibration.exact.double()  # (n, d_model)
    missed = exact - approx_outputs(mlp, x).double()  # (n, d_model)
    weight = 1 / exact.norm(dim=1, keepdim=True).clamp_min(1e-6)  # (n, 1)
    inputs = torch.from_numpy(augmented_queries(x)).double() * weight  # (n, D)
    targets = missed * weight  # (n, d_model)
    gram = inputs.T @ inputs  # (D, D): singular when the inputs come out of a LayerNorm
    ridge = 1e-4 * gram.trace() / len(gram)
    full = torch.linalg.solve(gram + ridge * torch.eye(len(gram), dtype=gram.dtype), inputs.T @ targets)  # (D, d_model)
    _, _, directions = torch.linalg.svd(inputs @ full, full_matrices=False)  # (d_model, d_model)
    out = directions[:rank]  # (r, d_model)
    return torch.cat([(full @ out.T).T, out], dim=1).float()  # (r, D + d_model)


def tune_candidates(calibration: LayerCalibration, codes: RowCodes | None, k: int, slack: float = 0.01) -> int:
    """Gated layers: the fewest candidates by gate score (k, then steps of k/4 in multiples of 16, up to
    d_ff) among which keeping the k largest |act(gate) * up|, up estimated from its 8-bit codes (exact
    without codes), keeps within `slack` of the |contribution| mass that choosing among all d_ff
    neurons keeps, on average over (at most 1024 of) the calibration inputs.

    The gate alone ranks the contributions poorly: on SmolLM2 at k = 768 of 1536 (held-out
    docstrings, layers 0/8/16/24/29) the top k by gate keep 0.46-0.86 of the mass, the top k by
    |silu(g) * u| 0.87-0.95, and the same chosen by 8-bit codes of u the same 0.87-0.95 (a
    rank-64 score-preserving estimate of u: 0.75-0.93).
    """
    weights, tokens = calibration.weights, slice(0, 1024)
    x = calibration.x[tokens]  # (n, d_model)
    scores, activations = (part[tokens] for part in calibration.dense)  # (n, d_ff) each
    up_estimate = x @ (weights.up.float() if codes is None else codes.decode()).T  # (n, d_ff)
    if weights.up_bias is not None:
        up_estimate = up_estimate + weights.up_bias.float()
    gate = activation_module(weights.activation, weights.topk, weights.threshold)(scores)  # (n, d_ff)
    estimate = (gate * up_estimate).abs()  # (n, d_ff)
    magnitude = activations.abs()  # (n, d_ff)
    total = magnitude.sum(1).clamp_min(1e-30)  # (n,)
    order = scores.argsort(dim=1, descending=True)  # (n, d_ff): the retrieval order

    def kept_mass(num_candidates: int) -> float:
        candidates = order[:, :num_candidates]  # (n, c)
        kept = candidates.gather(1, estimate.gather(1, candidates).topk(k, dim=1).indices)  # (n, k)
        return (magnitude.gather(1, kept).sum(1) / total).mean().item()

    d_ff = weights.d_ff
    quarter_steps = (k + step * k // 4 for step in range(1, 4 * d_ff // k + 1))
    sizes = sorted({k, d_ff} | {min(d_ff, round_up_16(size)) for size in quarter_steps})
    best = kept_mass(d_ff)
    return next(size for size in sizes if kept_mass(size) >= best - slack)


def gated_selection(config: BuildConfig, tune: LayerCalibration, k: int) -> dict[str, Any]:
    """ApproxMLP's selection options for a gated layer: {"candidates": c, "up_codes": (d_ff, d_model),
    "up_ranges": (2, d_model)}; none when the layer is not gated, the config turns it off, or the top k
    by gate score already keep (within the slack) what choosing among more would.

    A float32 model's candidates are chosen by 8-bit codes of its up rows, a quarter of their
    bytes; a bfloat16, float16 or GGUF model's by its own up rows (2 bytes per element read, or
    its blocks' 0.56-1.06), which cost no memory beside the model's (codes would add half the
    up rows' bytes, or more than the blocks).
    """
    if not (tune.weights.gated and config.gated_selection):
        return {}
    up = tune.weights.up
    codes = None if tune.weights.narrow_rows else RowCodes.encode(up.numpy())
    candidates = tune_candidates(tune, codes, k)
    if candidates == k:
        return {}
    if codes is None:
        return {"candidates": candidates}
    return {"candidates": candidates, "up_codes": codes.codes, "up_ranges": torch.from_numpy(codes.ranges)}


def corrected_mlp(
    config: BuildConfig,
    index: MipsIndex,
    k: int,
    tune: LayerCalibration,
    holdout: LayerCalibration,
    selection: dict[str, Any],
) -> tuple[ApproxMLP, dict[str, torch.Tensor], list[float] | None]:
    """The layer's approximate MLP, choosing neurons as `selection` says (gated_selection), with the
    tail correction the config asks for, fit on `tune`: (the MLP, {"tail_mean": (d_ff,),
    "tail_map": (r, D + d_model)} as kept, the held-out metrics.total_relative_error without and
    with the map, or None when none was fit)."""
    weights, tail = tune.weights, {}
    if config.tail_correction if config.tail_correction is not None else tail_correction_pays(weights):
        tail["tail_mean"] = dropped_mean(tune, k)  # (d_ff,)
    mlp = ApproxMLP(weights, index, k, index.search_params, **selection, **tail)
    rank = config.tail_map_rank if config.tail_map_rank is not None else default_tail_map_rank(weights)
    if not rank:
        return mlp, tail, None
    tail_map = fit_tail_map(mlp, tune, rank)  # (r, D + d_model)
    mapped = ApproxMLP(weights, index, k, index.search_params, **selection, **tail, tail_map=tail_map)
    errors = [round(total_relative_error(approx_outputs(m, holdout.x), holdout.exact), 6) for m in (mlp, mapped)]
    if errors[1] >= errors[0]:  # kept only where it helps on tokens it was not fit on
        return mlp, tail, errors
    return mapped, {**tail, "tail_map": tail_map}, errors


def default_build_params(backend: str, weights: MlpWeights) -> dict[str, Any]:
    """A build's backend parameters before the user's: DEFAULT_BUILD_PARAMS, and for a model
    holding narrow rows (16-bit, GGUF blocks) DEFAULT_BUILD_PARAMS_NARROW_ROWS over them."""
    return {
        **DEFAULT_BUILD_PARAMS.get(backend, {}),
        **(DEFAULT_BUILD_PARAMS_NARROW_ROWS.get(backend, {}) if weights.narrow_rows else {}),
    }


def build_layer(
    weights: MlpWeights,
    layer: int,
    config: BuildConfig,
    inputs: torch.Tensor,
    holdout_inputs: torch.Tensor,
    writer: StoreWriter | None = None,
    check_inputs: torch.Tensor | None = None,
) -> tuple[LayerEntry, MipsIndex, dict[str, np.ndarray]]:
    """One layer's index, tuned to the target recall on calibration inputs and measured on held-out
    ones, with the arrays beside it; written through `writer` when given.

    inputs, holdout_inputs: (n, d_model) MLP inputs of this layer on calibration text, in passage order.
    """
    start = time.perf_counter()
    backend = backend_class(config.backend)
    keys = augmented_keys(weights)  # (d_ff, d_model + 1)
    learn_q = None
    if backend.needs_queries:
        # Learn from the first passages, tune the effort on the last ones: tokens of
        # one passage look alike, so a random token split would tune in-sample.
        cut = len(inputs) * 3 // 4
        learn_q, inputs = augmented_queries(inputs[:cut]), inputs[cut:]
    tune = LayerCalibration(weights, _sample(inputs, MAX_TUNING_QUERIES, config.seed))  # (n, d_model)
    tune_q = augmented_queries(tune.x)
    k = layer_k(config, weights, tune)
    index = build_index(
        backend.name,
        keys,
        queries=learn_q,
        k=k,
        target_recall=config.target_recall,
        **backend.over_defaults(default_build_params(backend.name, weights), config.build_params),
    )
    index.hold_keys_like(weights.keys)  # tuned on the rows it will serve from
    holdout = LayerCalibration(weights, _sample(holdout_inputs, MAX_TUNING_QUERIES, config.seed))
    holdout_q = augmented_queries(holdout.x)
    key_t = torch.from_numpy(keys)
    if config.target_recall is not None:
        point = tune_effort(index, tune_q, torch.from_numpy(tune_q) @ key_t.T, k, config.target_recall)
        index.search_params = {index.effort_param: point.effort}
    held = measure(index, holdout_q, torch.from_numpy(holdout_q) @ key_t.T, k)
    check_recall = None
    if check_inputs is not None:
        check_q = augmented_queries(_sample(check_inputs, MAX_TUNING_QUERIES, config.seed))
        check_recall = round(measure(index, check_q, torch.from_numpy(check_q) @ key_t.T, k).recall, 6)
    log.info("layer %d: %s recall@%d=%.3f scanned=%.3f", layer, index, k, held.recall, held.scanned_fraction)
    files = writer.add_layer(layer, index) if writer else {}
    selection = gated_selection(config, tune, k)
    _, tail, tail_map_error = corrected_mlp(config, index, k, tune, holdout, selection)
    arrays = {part: array.numpy() for part, array in {**tail, **selection}.items() if part in LAYER_ARRAYS}
    array_files = {}  # part -> its file name in the store
    if writer:
        for part, array in arrays.items():
            saved = writer.add_array(layer, part, array)  # {name: sha256}
            files, array_files[part] = {**files, **saved}, next(iter(saved))
    entry = LayerEntry(
        layer=layer,
        d_model=weights.d_model,
        d_ff=weights.d_ff,
        gated=weights.gated,
        activation=weights.activation,
        backend=backend.name,
        build_params=index.build_params,
        search_params=index.search_params,
        effort_param=index.effort_param,
        effort_range=list(index.effort_range(k)),
        k=k,
        files=files,
        tail_map_error=tail_map_error,
        candidates=selection.get("candidates"),
        **{f"{part}_file": name for part, name in array_files.items()},
        build_recall=round(held.recall, 6),
        build_scanned_fraction=round(held.scanned_fraction, 6),
        check_recall=check_recall,
        build_seconds=round(time.perf_counter() - start, 3),
    )
    return entry, index, arrays


def build_indexes(
    checkpoint: Checkpoint,
    config: BuildConfig,
    calib_sources: Sequence[str | Path] = (),
    progress: bool = True,
    writer: StoreWriter | None = None,
    name: str = "in-memory",
) -> tuple[Manifest, dict[int, MipsIndex], dict[int, dict[str, np.ndarray]]]:
    """One index per layer, tuned on calibration text, and the arrays beside each layer's index: its
    tail correction ({"tail_mean": (d_ff,), "tail_map": (r, D + d_model)}, either or both, or none)
    and, for gated layers, the up codes of its selection ({"up_codes", "up_ranges"}).
    calib_sources: text.calibration_passages' sources; `writer` persists each layer as it is built."""
    backend = backend_class(config.backend)
    d_ffs = [checkpoint.adapter.mlp_weights(layer).d_ff for layer in range(checkpoint.num_layers)]
    if config.k is not None and config.k > min(d_ffs):
        raise InputError(f"k={config.k} exceeds d_ff={min(d_ffs)} of {checkpoint.source.spec}")
    check = check_text_in_use(config, calib_sources)
    check_format = replace(config.calibration, max_tokens=config.check_tokens)
    # The check text first: it is the smaller, and a file without text fails before the long calibration.
    check_batches, check_stats = (
        calibration_batches(checkpoint, check_format, passages(check, "evaluation", check_format))
        if check
        else ([], None)
    )
    calib_batches, text_stats = calibration_batches(
        checkpoint, config.calibration, calibration_passages(calib_sources, config.calibration)
    )
    stream = LayerByLayer(checkpoint, calib_batches + check_batches)
    entries, indexes, layer_arrays, queries = [], {}, {}, {}
    for layer in tqdm(range(checkpoint.num_layers), desc="layers", disable=not progress):
        per_batch = stream.next_layer()  # (n_b, d_model) per batch: calibration, then check
        tune_inputs, holdout_inputs = split_holdout(per_batch[: len(calib_batches)], config.holdout_fraction)
        queries.setdefault("tune", len(tune_inputs))
        queries.setdefault("holdout", len(holdout_inputs))
        weights = checkpoint.adapter.mlp_weights(layer)
        entry = writer.finished_layer(layer) if writer else None
        if entry is not None:  # finished by an earlier build that stopped
            log.info("layer %d: taken from the stopped build's %s", layer, writer.tmp.name)
            indexes[layer], layer_arrays[layer] = writer.load_finished(entry, augmented_keys(weights))
            indexes[layer].hold_keys_like(weights.keys)
        else:
            entry, indexes[layer], layer_arrays[layer] = build_layer(
                weights,
                layer,
                config,
                tune_inputs,
                holdout_inputs,
                writer,
                torch.cat(per_batch[len(calib_batches) :]) if check_batches else None,
            )
            if writer:
                writer.finish_layer(entry)
        entries.append(entry)
        del per_batch, tune_inputs, holdout_inputs, weights
        stream.release(layer)
        return_free_heap()  # what the layer's temporaries left free, before the next layer's
    # The last block's outputs go back before planning runs the whole model, which brings its
    # weights back into memory.
    del stream, calib_batches, check_batches
    return_free_heap()
    manifest = Manifest(
        name=name,
        family=checkpoint.family,
        kind=checkpoint.kind,
        backend=backend.name,
        k=config.k or max(entry.k for entry in entries),
        target_recall=config.target_recall,
        source=checkpoint.source.to_json(),
        build=config.to_json(),
        calibration={
            "text": describe_calibration(calib_sources, config.calibration),
            "sources": recorded_sources(calib_sources),
            "tokens": text_stats.tokens,
            "passages": text_stats.passages,
            "split_passages": text_stats.split,
            "cut_passages": text_stats.truncated,
            "tune_queries": min(queries["tune"], MAX_TUNING_QUERIES),
            "holdout_queries": min(queries["holdout"], MAX_TUNING_QUERIES),
            "seed": config.seed,
            "check_text": describe(check, "evaluation", config.calibration) if check else None,
            "check_tokens": check_stats.tokens if check_stats else 0,
        },
        layers=entries,
    )
    if config.plan:
        # The model reads the tables the indexes hold, as when served: no second copy while planning.
        # Not where that would put the caller's model in another neuron order (IVF's lists).
        share_model_tables(checkpoint, {layer: i for layer, i in indexes.items() if i.table_order() is None})
        planned = ApproxModel(manifest, checkpoint, indexes, layer_arrays=layer_arrays)
        for entry, plan in zip(entries, plan_model(planned).values()):
            entry.plan = plan
        manifest.extra["plan_machine"] = machine()
    return manifest, indexes, layer_arrays


def build_store(
    spec: str,
    out: Path,
    config: BuildConfig,
    calib_sources: Sequence[str | Path] = (),
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    backend_class(config.backend)  # an unknown backend fails before the model loads
    source = resolve_checkpoint(spec)
    with StoreWriter(out, overwrite=overwrite, resume_key=resume_key(source, config, calib_sources)) as writer:
        checkpoint = load_checkpoint(source, own_memory=False)  # read a layer at a time
        manifest, _, _ = build_indexes(checkpoint, config, calib_sources, progress, writer=writer, name=Path(out).name)
        return writer.commit(manifest)


def resume_key(source: CheckpointSource, config: BuildConfig, calib_sources: Sequence[str | Path]) -> str:
    """What a build's layers depend on: the weights, every setting, the calibration text and the
    code's version. A stopped build resumes only into a build of the same key."""
    built = {
        "weights": source.weight_files,
        "config": config.to_json(),
        "defaults": [DEFAULT_BUILD_PARAMS, DEFAULT_BUILD_PARAMS_NARROW_ROWS],
        "text": recorded_sources(calib_sources),
        "format": STORE_FORMAT_VERSION,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(built, sort_keys=True, default=str).encode()).hexdigest()
