"""A checkpoint together with its verified index store: the model with approximate MLPs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ann_mlp.approx_mlp import ApproxMLP, augmented_keys
from ann_mlp.checkpoint import (
    BUILTIN_CHECKPOINTS,
    Checkpoint,
    load_checkpoint,
    release_mapped_weights,
    resolve_checkpoint,
)
from ann_mlp.checkpoint.base import MlpWeights
from ann_mlp.errors import InputError, StoreError
from ann_mlp.index import MipsIndex
from ann_mlp.patch import patched
from ann_mlp.quantized import QuantizedMatrix
from ann_mlp.store import Manifest, Store


class ApproxModel:
    """Loads the store's checkpoint (checksums verified) and one ApproxMLP per layer."""

    def __init__(
        self,
        manifest: Manifest,
        checkpoint: Checkpoint,
        indexes: dict[int, MipsIndex],
        k: int | None = None,
        search_params: dict[str, Any] | None = None,
        layer_arrays: dict[int, dict[str, np.ndarray]] | None = None,
        neuron_orders: dict[int, np.ndarray] | None = None,
    ) -> None:
        """layer_arrays: per layer, the arrays beside its index (tail correction, up codes; from
        build.build_indexes or Store.load_layer_arrays). neuron_orders: per layer whose neurons
        open() reordered to share its index's table, that order (share_layer_tables)."""
        self.manifest = manifest
        self.checkpoint = checkpoint
        self.mlps: dict[int, ApproxMLP] = {}
        for entry in manifest.layers:
            weights = checkpoint.adapter.mlp_weights(entry.layer)
            assert (weights.d_ff, weights.d_model) == (entry.d_ff, entry.d_model)
            arrays = {
                part: torch.from_numpy(array) for part, array in (layer_arrays or {}).get(entry.layer, {}).items()
            }
            order = (neuron_orders or {}).get(entry.layer)
            self.mlps[entry.layer] = ApproxMLP(
                weights,
                indexes[entry.layer],
                entry.k or manifest.k,
                candidates=entry.candidates,
                neuron_order=None if order is None else torch.from_numpy(order),
                **arrays,
            )
        # Where approximation pays, per layer (planner.plan_layer records; None: approximate always).
        self.plans: dict[int, dict[str, Any] | None] = {entry.layer: entry.plan for entry in manifest.layers}
        self.configure(k, search_params)

    @classmethod
    def open(cls, store_path: Path | str, checkpoint: str | None = None, **options) -> ApproxModel:
        """checkpoint: override where the weights are (default: the path in the manifest)."""
        store = Store.open(store_path)
        source = resolve_checkpoint(checkpoint or recorded_checkpoint(store))
        store.verify_source(source)
        checkpoint = load_checkpoint(source)
        if len(store.manifest.layers) > checkpoint.num_layers:
            raise StoreError(
                f"store {store.path} has {len(store.manifest.layers)} layers, its checkpoint {checkpoint.num_layers}"
            )
        indexes, keys = {}, {}
        for entry in store.manifest.layers:
            weights = checkpoint.adapter.mlp_weights(entry.layer)
            layer_keys = augmented_keys(weights)  # (d_ff, d_model + 1)
            indexes[entry.layer] = store.load_index(entry.layer, layer_keys)
            indexes[entry.layer].hold_keys_like(weights.keys)
            if indexes[entry.layer].key_table() is None:  # what share_model_tables shares instead
                keys[entry.layer] = layer_keys
        orders = share_model_tables(checkpoint, indexes, keys)
        arrays = {entry.layer: store.load_layer_arrays(entry.layer) for entry in store.manifest.layers}
        return cls(store.manifest, checkpoint, indexes, layer_arrays=arrays, neuron_orders=orders, **options)

    def configure(
        self, k: int | None = None, search_params: dict[str, Any] | None = None, candidate_factor: float | None = None
    ) -> None:
        """Set k, query-time search parameters and the candidates retrieved per kept neuron for
        every layer (None: the store's values per layer; the store's candidates scale with k)."""
        for layer, mlp in self.mlps.items():
            entry = self.manifest.layers[layer]
            layer_k = (entry.k or self.manifest.k) if k is None else k
            if not 1 <= layer_k <= mlp.weights.d_ff:
                raise InputError(f"k must be in [1, d_ff={mlp.weights.d_ff}], got {layer_k}")
            params = dict(entry.search_params)
            for name, value in (search_params or {}).items():
                if name != entry.effort_param:
                    raise InputError(
                        f"backend {entry.backend} has no search parameter {name!r} (it has {entry.effort_param!r})"
                    )
                lo, hi = mlp.index.effort_range(layer_k)
                if not lo <= int(value) <= hi:
                    raise InputError(f"{name} must be in [{lo}, {hi}], got {value}")
                params[name] = int(value)
            mlp.k, mlp.search_params = layer_k, params
            if candidate_factor is None:  # the built ratio of candidates to k, in exact integer arithmetic
                built_k = entry.k or self.manifest.k
                candidates = -(-layer_k * (entry.candidates or built_k) // built_k)
            else:
                candidates = math.ceil(candidate_factor * layer_k)
            mlp.candidates = min(mlp.weights.d_ff, candidates)

    @contextmanager
    def configured(
        self, k: int | None = None, search_params: dict[str, Any] | None = None, candidate_factor: float | None = None
    ) -> Iterator[None]:
        """Within the block every layer runs with these settings (as `configure`); the settings
        in force before return after it, so a caller's k or effort never outlives its block."""
        saved = {layer: (mlp.k, mlp.search_params, mlp.candidates) for layer, mlp in self.mlps.items()}
        try:
            self.configure(k, search_params, candidate_factor)
            yield
        finally:
            for layer, (layer_k, params, candidates) in saved.items():
                mlp = self.mlps[layer]
                mlp.k, mlp.search_params, mlp.candidates = layer_k, params, candidates

    @contextmanager
    def approximate(
        self,
        planned: bool = False,
        k: int | None = None,
        search_params: dict[str, Any] | None = None,
        candidate_factor: float | None = None,
    ) -> Iterator[None]:
        """Within the block, the checkpoint's model runs with approximate MLPs, at k, search
        parameters and candidates per kept neuron given for the block (None: the settings in force).

        planned: follow the store's plan, running dense the layers and batch sizes
        where search was measured not to pay (layers without a plan approximate).
        A layer whose plan never pays keeps the model's own MLP, untouched: the
        dense path at no cost, its tokens still counted as dense.
        """
        if (k, search_params, candidate_factor) != (None, None, None):
            with self.configured(k, search_params, candidate_factor), self.approximate(planned):
                yield
            return
        patch, untouched = {}, {}
        for entry in self.manifest.layers:
            mlp = self.mlps[entry.layer]
            plan = self.plans[entry.layer] if planned else None
            mlp.approx_up_to = plan["approx_up_to"] if plan else None
            (untouched if mlp.approx_up_to == 0 else patch)[entry.layer] = mlp
        adapter = self.checkpoint.adapter
        counters = [
            self.checkpoint.model.get_submodule(adapter.mlp_input_path(layer)).register_forward_pre_hook(
                lambda _module, args, mlp=mlp: _count_dense(mlp, args[0])
            )
            for layer, mlp in untouched.items()
        ]
        try:
            with patched(adapter, patch), torch.inference_mode():
                yield
        finally:
            for counter in counters:
                counter.remove()
            for mlp in self.mlps.values():
                mlp.approx_up_to = None

    def reset_stats(self) -> None:
        for mlp in self.mlps.values():
            mlp.stats.reset()


def share_model_tables(
    checkpoint: Checkpoint, indexes: dict[int, MipsIndex], keys: dict[int, np.ndarray] | None = None
) -> dict[int, np.ndarray]:
    """share_layer_tables for every indexed layer; returns the neuron order of each layer whose
    neurons were put in its index's table order (ApproxModel's neuron_orders). A weight the model
    no longer holds gives back its pages if it was memory-mapped from its file. keys: augmented
    keys the caller has already, of layers whose index holds no table (computed here otherwise)."""
    orders = {}
    for layer, index in indexes.items():
        weights = checkpoint.adapter.mlp_weights(layer)
        if isinstance(weights.keys, QuantizedMatrix):  # the index and ApproxMLP read the model's blocks
            continue
        held, order = index.key_table(), index.table_order()
        if held is None:  # the model's own keys, augmented: (d_ff, d_model + 1)
            held = torch.from_numpy(keys[layer] if keys and layer in keys else augmented_keys(weights))
        share_layer_tables(checkpoint.model, weights, held, order)  # held (d_ff, >= d_model + 1)
        release_mapped_weights([weights.keys, weights.key_bias, weights.values, weights.up, weights.up_bias])
        if order is not None:
            orders[layer] = order
    return orders


def share_layer_tables(
    model: nn.Module, weights: MlpWeights, key_table: torch.Tensor, order: np.ndarray | None = None
) -> None:
    """Hold one layer's MLP weights once, in the layouts the approximate path reads.

    key_table: (d_ff, >= d_model + 1), the augmented keys [k_i; b_i] (the index's own when it
    holds them), columns past d_model + 1 ignored; order: (d_ff,) the neuron in each of its
    rows, when not in the model's order (MipsIndex.table_order). When the table is in the
    model's dtype, points the model's key and bias parameters at views of it; always its value
    parameters at a contiguous (d_ff, d_model) table (a transposed view where the family stores
    the matrix the other way round), so the dense model, the index and ApproxMLP read the same
    memory and the old tensors are freed. A bfloat16 or float16 model whose index holds float32
    keys (faiss, ScaNN) keeps its own: pointing them at a float32 table would double them, and
    its dense path computes in its own dtype. With an order, every per-neuron parameter
    (values, up rows and bias) is put in it too: a permutation of an MLP's neurons leaves its
    output unchanged.
    """
    rows = slice(None) if order is None else torch.from_numpy(order)
    if key_table.dtype == weights.keys.dtype:
        _repoint(model, weights.keys, key_table[:, : weights.d_model])
        if weights.key_bias is not None:
            _repoint(model, weights.key_bias, key_table[:, weights.d_model])
    elif order is not None:  # a bfloat16 or float16 model keeps its own keys, in the table's order
        for per_neuron in (weights.keys, weights.key_bias):
            if per_neuron is not None:
                _repoint(model, per_neuron, per_neuron[rows].contiguous())
    _repoint(model, weights.values, weights.values[rows].contiguous())
    if order is not None:
        for per_neuron in (weights.up, weights.up_bias):
            if per_neuron is not None:
                _repoint(model, per_neuron, per_neuron[rows].contiguous())


def _repoint(model: nn.Module, current: torch.Tensor, replacement: torch.Tensor) -> None:
    """Make the parameter `current` views (itself or its transpose) hold `replacement`'s storage."""
    for parameter in model.parameters():
        if parameter.data_ptr() != current.data_ptr() or parameter.numel() != current.numel():
            continue
        if parameter.shape == current.shape and parameter.stride() == current.stride():
            parameter.data = replacement
        else:  # the adapter handed out the transpose of the stored matrix
            parameter.data = replacement.T
        return
    raise AssertionError("adapter weights are not views of the model's parameters")


def _count_dense(mlp: ApproxMLP, hidden_states: torch.Tensor) -> None:
    mlp.stats.dense_tokens += hidden_states.numel() // mlp.weights.d_model


def recorded_checkpoint(store: Store) -> str:
    """The weights' recorded location; a built-in name is re-resolved (packages move between venvs)."""
    source = store.manifest.source
    if source["spec"] in BUILTIN_CHECKPOINTS:
        return source["spec"]
    path = Path(source["path"])
    return str(path / source["gguf_file"]) if source.get("gguf_file") else str(path)
