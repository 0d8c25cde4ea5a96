"""GGUF checkpoints kept in their quantized blocks: the kernels against gguf's own de-quantizer,
loading without float32 copies, and the model, the exact path and the approximate path against
the same weights de-quantized by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from ann_mlp import quantized
from ann_mlp.approx_model import ApproxModel
from ann_mlp.build import build_store
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.config import BuildConfig, TextConfig
from ann_mlp.decode import generate
from ann_mlp.linalg import rows_dot
from ann_mlp.quantized import QuantizedEmbedding, QuantizedLinear, QuantizedMatrix, owned_blocks
from tests.conftest import GGUF_TYPES
from tests.tiny_checkpoints import D_FF

PROMPTS = [[5, 9, 14, 20, 33, 41], [7, 8], [100, 3, 60, 61]]


def dequantized_model(path: str) -> torch.nn.Module:
    """The same file as transformers loads it: every tensor de-quantized to float32."""
    folder, _, name = path.rpartition("/")
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_blocks_read_as_gguf_dequantizes_them(qtype):
    """Rows, columns, the whole matrix and its transpose equal gguf's own de-quantizer bit for bit;
    the products built on them equal the same products of the de-quantized matrix."""
    rng = np.random.default_rng(0)
    dense = rng.standard_normal((40, 96)).astype(np.float32)
    kind = GGMLQuantizationType[qtype]
    blocks = quantize(dense, kind)
    reference = torch.from_numpy(dequantize(blocks, kind))  # (40, 96)
    matrix = QuantizedMatrix(owned_blocks(blocks), kind, cols=96)
    rows, cols = torch.tensor([3, 0, 39, 7]), torch.tensor([0, 15, 16, 31, 32, 95, 50])
    assert torch.equal(matrix.float(), reference) and torch.equal(matrix.t().float(), reference.T)
    assert torch.equal(matrix.stored_rows(rows), reference[rows])
    assert torch.equal(matrix.stored_columns(cols), reference[:, cols])
    assert matrix.t().shape == (96, 40) and matrix.nbytes == blocks.size

    x = torch.randn(5, 96)
    torch.testing.assert_close(matrix.times_rows(x), x @ reference.T)
    torch.testing.assert_close(matrix.t().right_multiply(x), x @ reference.T)
    h = torch.randn(5, 40)
    torch.testing.assert_close(matrix.right_multiply(h), h @ reference)
    ids = torch.randint(0, 40, (5, 6))
    expected = torch.einsum("nkd,nd->nk", reference[ids], x)
    torch.testing.assert_close(matrix.rows_dot(ids, x), expected)
    torch.testing.assert_close(rows_dot(matrix, ids, x), expected)  # the shared kernel dispatches
    many, batch = torch.randint(0, 40, (16, 30)), torch.randn(16, 96)  # selections outnumber the rows
    torch.testing.assert_close(rows_dot(matrix, many, batch), rows_dot(reference, many, batch))
    value_ids, weights = torch.randint(0, 96, (5, 6)), torch.randn(5, 6)
    torch.testing.assert_close(
        matrix.t().weighted_rows_sum(value_ids, weights), torch.einsum("nk,nkd->nd", weights, reference.T[value_ids])
    )


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_dense_products_de_quantize_a_chunk_of_rows_at_a_time_into_one_buffer(qtype, monkeypatch):
    """Chunks of 3 stored rows, the last one short, each read into the same buffer: every chunk
    equals gguf's rows while it is read, and the products over them equal the whole matrix's."""
    monkeypatch.setattr(quantized, "MAX_DEQUANTIZED", 3 * 96)
    rng = np.random.default_rng(1)
    kind = GGMLQuantizationType[qtype]
    blocks = quantize(rng.standard_normal((40, 96)).astype(np.float32), kind)
    reference = torch.from_numpy(dequantize(blocks, kind))  # (40, 96)
    matrix = QuantizedMatrix(owned_blocks(blocks), kind, cols=96)
    chunks = []
    for rows, chunk in matrix.stored_row_chunks():
        assert torch.equal(chunk, reference[rows])
        chunks.append((rows.start, rows.stop, chunk.data_ptr()))
    assert chunks[-1][:2] == (39, 40) and len({pointer for *_, pointer in chunks}) == 1
    x, h = torch.randn(5, 96), torch.randn(5, 40)
    torch.testing.assert_close(matrix.times_rows(x), x @ reference.T)
    torch.testing.assert_close(matrix.times_columns(h), h @ reference)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_a_gguf_model_keeps_its_blocks_and_computes_as_the_dequantized_one(tiny_ggufs, qtype):
    """Every matrix stays in its blocks (the tied output layer reads the embedding's), no
    parameter holds a float32 matrix, and the logits and greedy tokens are those of the same
    file de-quantized by transformers, bit for bit."""
    checkpoint = load_checkpoint(tiny_ggufs[qtype])
    model = checkpoint.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert not linears and len(quantized) == 2 * 7 + 1
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert model.lm_head.weight.blocks is model.get_input_embeddings().weight.blocks
    assert all(p.dim() == 1 for p in model.parameters())  # norms only
    reference = dequantized_model(tiny_ggufs[qtype])
    ids = torch.tensor(PROMPTS[0])[None]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    for prompt in PROMPTS:
        (ours,) = generate(model, [prompt], 8, eos_token_id=None, pad_token_id=0)
        (theirs,) = generate(reference, [prompt], 8, eos_token_id=None, pad_token_id=0)
        assert ours.tokens == theirs.tokens


@pytest.fixture(scope="module")
def gguf_store(tiny_ggufs, tmp_path_factory):
    config = BuildConfig(k=D_FF, target_recall=None, calibration=TextConfig(max_tokens=600), check_text=None)
    return build_store(tiny_ggufs["Q4_1"], tmp_path_factory.mktemp("gguf-store") / "q4_1", config, progress=False)


def test_a_gguf_store_reads_the_models_blocks_and_is_exact_at_full_k(tiny_ggufs, gguf_store):
    """The index re-ranks from the gate's own blocks and ApproxMLP sums value rows out of the
    down matrix's: no float32 table of either beside the model. At k = d_ff the approximate
    model gives the exact model's logits to float32 rounding (relative error < 1e-5: the same
    de-quantized values summed in another order), and exact mode the de-quantized model's tokens."""
    model = ApproxModel.open(gguf_store)
    for layer, mlp in model.mlps.items():
        gate = model.checkpoint.model.model.layers[layer].mlp.gate_proj.weight
        assert isinstance(mlp.index.key_table(), QuantizedMatrix)
        assert mlp.index.key_table().blocks is gate.blocks
        assert isinstance(mlp.value_rows, QuantizedMatrix) and mlp.up_codes is None
    ids = torch.tensor(PROMPTS[0])[None]
    reference = dequantized_model(tiny_ggufs["Q4_1"])
    with torch.inference_mode():
        exact = reference(ids).logits
        with model.approximate():
            approx = model.checkpoint.model(ids).logits
    assert float((approx - exact).norm() / exact.norm()) < 1e-5
    assert model.mlps[0].stats.queries == ids.numel() and model.mlps[0].stats.bytes_read > 0
    # The planner's dense path reads the blocks as the model's own MLP does.
    mlp, x = model.mlps[1], torch.randn(3, 4, model.mlps[1].weights.d_model)
    own = model.checkpoint.model.get_submodule(model.checkpoint.adapter.mlp_input_path(1))
    with torch.inference_mode():
        torch.testing.assert_close(mlp.dense_forward(x), own(x))
    # Exact mode is the checkpoint's own modules: the de-quantized model's tokens.
    for prompt in PROMPTS:
        (ours,) = generate(model.checkpoint.model, [prompt], 8, eos_token_id=None, pad_token_id=0)
        (theirs,) = generate(reference, [prompt], 8, eos_token_id=None, pad_token_id=0)
        assert ours.tokens == theirs.tokens


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_gguf_tensor_names_map_as_transformers_maps_them(model_type):
    """One build of gguf's name table maps every parameter as transformers' recursive mapping does."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    from ann_mlp.checkpoint.gguf import gguf_to_model_names

    config = transformers.AutoConfig.for_model(
        model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    processor = TENSOR_PROCESSORS.get(model_type, TensorProcessor)(config=config.to_dict())
    names = gguf_to_model_names(model, processor)
    assert names == get_gguf_hf_weights_map(model, processor)
    assert names["blk.2.ffn_gate.weight"] == "model.layers.2.mlp.gate_proj.weight"
    assert sorted(names.values()) == sorted(model.state_dict())  # every parameter has its tensor
