"""Top-k Transformer checkpoints (config `ann_mlp_topk`): loaded, approximated and measured consistently."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from ann_mlp.activations import SparseActivation
from ann_mlp.approx_mlp import ApproxMLP, augmented_keys
from ann_mlp.capture import forward, make_batch
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.config import TextConfig
from ann_mlp.index import build_index
from ann_mlp.patch import patched
from ann_mlp.sparsity import measure_sparsity

K = 8


@pytest.fixture(scope="module")
def topk_checkpoint(tiny_checkpoints, tmp_path_factory):
    folder = tmp_path_factory.mktemp("topk") / "opt-topk"
    shutil.copytree(tiny_checkpoints["opt"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "ann_mlp_topk": K}))
    return folder


def test_loading_installs_topk_and_changes_the_model(topk_checkpoint, tiny_checkpoints):
    topk = load_checkpoint(str(topk_checkpoint))
    plain = load_checkpoint(str(tiny_checkpoints["opt"]))
    assert isinstance(topk.model.model.decoder.layers[1].activation_fn, SparseActivation)
    assert topk.adapter.mlp_weights(0).topk == K and plain.adapter.mlp_weights(0).topk is None
    batch = make_batch(topk, ["Top-k changes what the MLP computes."], 32)
    assert not torch.allclose(forward(topk, batch).logits, forward(plain, batch).logits)


@pytest.mark.parametrize("k", [K, 24, 96])
def test_retrieving_at_least_k_keys_is_exact(topk_checkpoint, k):
    checkpoint = load_checkpoint(str(topk_checkpoint))
    batch = make_batch(checkpoint, ["An exact top-k search reproduces a Top-k model.", "Yes."], 32)
    exact = forward(checkpoint, batch).logits
    mlps = {}
    for layer in range(checkpoint.num_layers):
        weights = checkpoint.adapter.mlp_weights(layer)
        mlps[layer] = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=k)
    with patched(checkpoint.adapter, mlps):
        approx = forward(checkpoint, batch).logits
    assert float((approx - exact).norm() / exact.norm()) < 1e-5


def test_sparsity_of_a_topk_model_is_at_most_k(topk_checkpoint):
    report = measure_sparsity(load_checkpoint(str(topk_checkpoint)), None, TextConfig(max_tokens=300), progress=False)
    for layer in report.layers:
        assert layer.measure == "nonzero_activations"
        assert 0 < layer.per_token_pct_percentiles["p99"] <= 100 * K / layer.d_ff + 1e-6
