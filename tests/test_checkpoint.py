from __future__ import annotations

import json
import shutil

import pytest
import torch

from ann_mlp.checkpoint import load_checkpoint, resolve_checkpoint
from ann_mlp.errors import CheckpointError
from tests.tiny_checkpoints import D_FF, D_MODEL, LAYERS, write_tiny_checkpoint


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


@pytest.mark.parametrize("float16_arithmetic", [True, False])
def test_half_precision_checkpoints_load_in_their_dtype(half_checkpoints, monkeypatch, float16_arithmetic):
    """bfloat16 safetensors load as they are stored: no float32 copy of any weight. float16 ones
    too where the CPU computes in float16, and in float32 where torch would emulate it."""
    from ann_mlp import checkpoint as checkpoints

    monkeypatch.setattr(checkpoints, "cpu_has_float16_arithmetic", lambda: float16_arithmetic)
    for (family, stored), folder in half_checkpoints.items():
        expected = torch.float32 if stored == "float16" and not float16_arithmetic else getattr(torch, stored)
        checkpoint = load_checkpoint(str(folder))
        assert {p.dtype for p in checkpoint.model.parameters()} == {expected}, (family, stored)


def _resident_bytes_of_mapping(path: str) -> int:
    """Resident bytes of this process's memory maps of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == path
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_copied_weights_release_the_pages_of_their_file_map_and_nothing_else():
    """What keeps a load at the model's size plus one tensor: once a tensor is copied, the pages it
    read from a weight file's map leave memory; memory outside such a map is left alone."""
    import mmap

    from ann_mlp.checkpoint import _release_mapped_pages

    path = str(resolve_checkpoint("relu-lm").folder / "model.safetensors")
    with open(path, "rb") as file:
        mapping = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    mapped = torch.frombuffer(mapping, dtype=torch.uint8)
    checksum = int(mapped.sum())  # reads every page
    assert _resident_bytes_of_mapping(path) > 0.9 * len(mapping)
    start = mapped.data_ptr()
    _release_mapped_pages(mapped, [(start, start + len(mapping))])
    assert _resident_bytes_of_mapping(path) < 0.01 * len(mapping)
    assert int(mapped.sum()) == checksum  # read back from the file, unchanged
    owned = torch.arange(1 << 20, dtype=torch.float32)
    _release_mapped_pages(owned, [(start, start + len(mapping))])
    assert torch.equal(owned, torch.arange(1 << 20, dtype=torch.float32))
    del mapped
    mapping.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_loaded_model_owns_its_weights(tmp_path, dtype):
    """A weight file rewritten in place after loading cannot change the model."""
    write_tiny_checkpoint("llama", tmp_path, dtype=dtype)
    checkpoint = load_checkpoint(str(tmp_path))
    assert {p.dtype for p in checkpoint.model.parameters()} == {dtype}
    before = [p.clone() for p in checkpoint.model.parameters()]
    size = (tmp_path / "model.safetensors").stat().st_size
    (tmp_path / "model.safetensors").write_bytes(b"\0" * size)
    assert all(torch.equal(p, q) for p, q in zip(checkpoint.model.parameters(), before))
