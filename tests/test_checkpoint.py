from __future__ import annotations

import json
import shutil

import pytest
import torch

from ann_mlp.checkpoint import load_checkpoint, resolve_checkpoint
from ann_mlp.errors import CheckpointError
from tests.tiny_checkpoints import D_FF, D_MODEL, LAYERS


def test_adapter_yields_weights_of_every_layer(tiny_checkpoint):
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    expected_layers = 2 * LAYERS if checkpoint.family == "t5" else LAYERS
    assert checkpoint.num_layers == expected_layers
    for layer in range(checkpoint.num_layers):
        weights = checkpoint.adapter.mlp_weights(layer)
        assert weights.keys.shape == (D_FF, D_MODEL)
        assert weights.values.shape == (D_FF, D_MODEL)
        assert weights.gated == (checkpoint.family in ("llama", "mistral", "qwen2"))
        has_bias = checkpoint.family in ("bert", "gpt2", "opt")
        assert (weights.key_bias is not None) == has_bias
        assert (weights.out_bias is not None) == has_bias


def test_gpt2_conv1d_weights_are_transposed_to_rows(tiny_checkpoints):
    checkpoint = load_checkpoint(str(tiny_checkpoints["gpt2"]))
    mlp = checkpoint.model.transformer.h[0].mlp
    x = torch.randn(3, D_MODEL)
    weights = checkpoint.adapter.mlp_weights(0)
    # Conv1D computes x @ W + b; key rows must give the same pre-activations.
    torch.testing.assert_close(x @ weights.keys.T + weights.key_bias, mlp.c_fc(x))


def test_source_records_sha256_of_every_weight_file(tiny_checkpoints):
    source = resolve_checkpoint(str(tiny_checkpoints["bert"]))
    assert list(source.weight_files) == ["model.safetensors"]
    assert all(len(sha) == 64 for sha in source.weight_files.values())


def test_sharded_safetensors_load(tiny_checkpoints, tmp_path):
    checkpoint = load_checkpoint(str(tiny_checkpoints["opt"]))
    checkpoint.model.save_pretrained(tmp_path, max_shard_size="20KB")
    shutil.copy(tiny_checkpoints["opt"] / "tokenizer.json", tmp_path)
    shutil.copy(tiny_checkpoints["opt"] / "tokenizer_config.json", tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    sharded = load_checkpoint(str(tmp_path))
    assert len(sharded.source.weight_files) > 1
    torch.testing.assert_close(sharded.adapter.mlp_weights(1).keys, checkpoint.adapter.mlp_weights(1).keys)


def test_pickled_weights_are_refused_without_unpickling(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    # Not a valid pickle: unpickling it would fail differently than the refusal.
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="refusing pickled weights"):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match="refusing pickled weights"):
        resolve_checkpoint(str(tmp_path / "pytorch_model.bin"))


def test_folder_without_weights_and_unknown_family(tmp_path, tiny_checkpoints):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="no .safetensors"):
        resolve_checkpoint(str(tmp_path))
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_checkpoints["bert"], unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "electra"}))
    with pytest.raises(CheckpointError, match="unsupported model family 'electra'"):
        load_checkpoint(str(unknown))
    with pytest.raises(CheckpointError, match="not found"):
        resolve_checkpoint(str(tmp_path / "nowhere"))


def test_builtin_minilm_is_bert_gelu_6_layers():
    checkpoint = load_checkpoint("minilm")
    assert checkpoint.family == "bert" and checkpoint.kind == "encoder"
    assert checkpoint.num_layers == 6
    weights = checkpoint.adapter.mlp_weights(5)
    assert (weights.d_ff, weights.d_model, weights.activation) == (1536, 384, "gelu")


def test_builtin_smollm2_gguf_is_gated_llama_30_layers():
    source = resolve_checkpoint("smollm2")
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    checkpoint = load_checkpoint(source)
    assert checkpoint.family == "llama" and checkpoint.num_layers == 30
    weights = checkpoint.adapter.mlp_weights(29)
    assert (weights.d_ff, weights.d_model, weights.gated, weights.activation) == (1536, 576, True, "silu")


def test_builtin_relu_lm_trained_here_is_sparse_on_held_out_text():
    from ann_mlp.config import TextConfig
    from ann_mlp.sparsity import measure_sparsity

    checkpoint = load_checkpoint("relu-lm")
    assert checkpoint.family == "opt" and checkpoint.kind == "causal_lm" and checkpoint.adapter.topk is None
    assert checkpoint.adapter.mlp_weights(0).d_ff == 4096
    # Python docstrings: text of another domain than the kernel documentation it was trained on
    report = measure_sparsity(checkpoint, None, TextConfig(max_tokens=1000), progress=False)
    assert all(layer.measure == "nonzero_activations" for layer in report.layers)
    assert report.layers[0].nonzero_pct < 40 and all(layer.nonzero_pct < 10 for layer in report.layers[1:])


def test_repo_model_missing_from_the_tree_is_a_clear_error(monkeypatch, tmp_path):
    from ann_mlp.checkpoint import builtin

    monkeypatch.setattr(builtin, "REPO_MODELS", tmp_path)
    with pytest.raises(CheckpointError, match="not in this source tree"):
        resolve_checkpoint("relu-lm")


@pytest.mark.parametrize("name, topk, d_ff", [("topk-lm", 128, 4096), ("wide-lm", 512, 16384)])
def test_builtin_top_k_lms_fire_at_most_k_neurons(name, topk, d_ff):
    from ann_mlp.config import PRESET_BUILDS, TextConfig
    from ann_mlp.sparsity import measure_sparsity

    checkpoint = load_checkpoint(name)
    assert checkpoint.adapter.topk == topk and checkpoint.adapter.mlp_weights(0).d_ff == d_ff
    report = measure_sparsity(checkpoint, None, TextConfig(max_tokens=500), progress=False)
    assert all(layer.per_token_pct_percentiles["p99"] <= topk / d_ff * 100 + 1e-9 for layer in report.layers)
    if name == "wide-lm":  # its preset keeps the model's own k
        assert PRESET_BUILDS[name].k == topk


def test_builtin_minilm_sparse_fires_one_sixteenth():
    checkpoint = load_checkpoint("minilm-sparse")
    assert checkpoint.family == "bert" and checkpoint.adapter.topk == 96
    assert checkpoint.adapter.mlp_weights(0).d_ff == 1536 and checkpoint.adapter.mlp_weights(0).activation == "gelu"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoints_load_in_their_dtype(half_checkpoints, dtype):
    """bfloat16 and float16 safetensors load as they are stored: no float32 copy of any weight."""
    for (family, stored), folder in half_checkpoints.items():
        if stored != dtype:
            continue
        checkpoint = load_checkpoint(str(folder))
        assert {p.dtype for p in checkpoint.model.parameters()} == {getattr(torch, dtype)}, family
