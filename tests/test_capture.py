"""A build reads the model one block at a time (capture.LayerByLayer): the same MLP inputs as a whole
forward pass, bit for bit, and each finished block's mapped weight pages given back."""

from __future__ import annotations

import pytest
import torch
import transformers

from ann_mlp.build import build_store
from ann_mlp.capture import LayerByLayer, batches, forward_capturing
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.config import BuildConfig, TextConfig
from ann_mlp.store import Store
from ann_mlp.text import calibration_passages
from tests.test_checkpoint import _resident_bytes_of_mapping
from tests.tiny_checkpoints import FAMILIES, byte_tokenizer

TEXT = TextConfig(max_tokens=600, batch_size=4, max_seq_len=64)


def _batches(checkpoint):
    return list(batches(checkpoint, calibration_passages(["stdlib"], TEXT), TEXT))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_by_layer_gives_a_whole_forward_passes_mlp_inputs(tiny_checkpoints, half_checkpoints, family):
    """Padded batches of unequal lengths; T5 (no blocks_path) takes the whole-pass route."""
    folders = [tiny_checkpoints[family]] + [
        folder
        for (half_family, dtype), folder in half_checkpoints.items()
        if half_family == family and dtype == "bfloat16"
    ]
    for folder in folders:
        checkpoint = load_checkpoint(str(folder))
        runs = _batches(checkpoint)
        assert len(runs) > 1 and not bool(runs[0].mask.all())  # padding is in play
        whole = [forward_capturing(checkpoint, batch, range(checkpoint.num_layers))[1] for batch in runs]
        stream = LayerByLayer(checkpoint, runs)
        assert (stream.blocks is None) == (family == "t5")
        for layer in range(checkpoint.num_layers):
            inputs = stream.next_layer()
            assert all(torch.equal(x, captured[layer]) for x, captured in zip(inputs, whole)), (folder.name, layer)


@pytest.mark.parametrize("weights", ["safetensors", "gguf"])
def test_a_block_by_block_build_writes_the_store_of_a_whole_pass_build(
    tiny_checkpoints, tiny_ggufs, tmp_path, monkeypatch, weights
):
    """The same layer files, byte for byte, whether the build runs block by block (from mapped
    weights, or from a GGUF model's quantized blocks) or captures every layer in whole forward passes."""
    from ann_mlp.checkpoint.llama import LlamaAdapter

    config = BuildConfig(k=16, target_recall=0.9, calibration=TextConfig(max_tokens=600), plan=False)
    spec = str(tiny_checkpoints["llama"]) if weights == "safetensors" else tiny_ggufs["Q4_1"]
    streamed = Store.open(build_store(spec, tmp_path / "streamed", config, progress=False)).manifest
    monkeypatch.setattr(LlamaAdapter, "blocks_path", None)
    whole = Store.open(build_store(spec, tmp_path / "whole", config, progress=False)).manifest
    assert [entry.files for entry in streamed.layers] == [entry.files for entry in whole.layers]
    assert streamed.calibration == whole.calibration


def test_a_finished_block_gives_back_its_mapped_weight_pages(tmp_path):
    """Weights loaded without copying stay in their file's map; once a block's layer is done its
    pages leave memory, and the next block's stay until it is done."""
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4
    )
    transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    checkpoint = load_checkpoint(str(tmp_path), own_memory=False)
    path = str((tmp_path / "model.safetensors").resolve())
    block_bytes = [
        sum(p.numel() * p.element_size() for p in checkpoint.model.model.layers[layer].parameters())
        for layer in range(2)
    ]
    stream = LayerByLayer(checkpoint, _batches(checkpoint))
    stream.next_layer()
    stream.next_layer()
    before = _resident_bytes_of_mapping(path)
    assert before >= sum(block_bytes)  # both blocks ran: their weights are resident, in the map
    stream.release(0)
    after = _resident_bytes_of_mapping(path)
    assert before - after >= 0.95 * block_bytes[0]
    assert after >= block_bytes[1]
