"""Inputs packed end to end into rows (ann_mlp.packing): the padded batch's hidden states, no padding
computed where rows can share, and the padded batch itself for families that cannot pack."""

from __future__ import annotations

import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st

from ann_mlp.capture import batch_from_ids, forward
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.checkpoint.bert import BertAdapter
from ann_mlp.packing import pack, packed_rows

TINY = dict(
    vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, pad_token_id=1
)


def _encoder(model_type: str, attention: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    config = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[model_type](
        **TINY, max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    torch.manual_seed(0)
    return transformers.AutoModel.from_config(config, attn_implementation=attention, dtype=dtype).eval()


# Every attention implementation reads the packed rows' mask, in the model's dtype.
ENCODERS = {
    (model_type, attention, dtype): _encoder(model_type, attention, dtype)
    for model_type in ("bert", "roberta")
    for attention in ("sdpa", "eager")
    for dtype in (torch.float32, torch.bfloat16)
}
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}  # bfloat16: about one unit in the last place


def _padded(lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, mask), (B, T), with ids clear of the pad token."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(2, 64, (len(lengths), width), generator=generator)
    mask = torch.arange(width) < torch.tensor(lengths).unsqueeze(1)  # (B, T)
    return ids.masked_fill(~mask, 1), mask.long()


@settings(max_examples=40, deadline=None)
@given(
    encoder=st.sampled_from(list(ENCODERS)),
    lengths=st.lists(st.integers(1, 40), min_size=2, max_size=9),
    seed=st.integers(0, 2**16),
)
def test_packed_rows_give_the_padded_batchs_hidden_states(encoder, lengths, seed):
    """Each input sees its own tokens at its own positions (RoBERTa's from padding_idx + 1), so
    every real position's hidden state is the padded pass's; padding is zero."""
    model = ENCODERS[encoder]
    tolerance = TOLERANCE[model.dtype]
    input_ids, mask = _padded(lengths, seed)
    packing = pack(BertAdapter(model), input_ids, mask)
    if packing is None:  # nothing shares a row: the padded batch runs
        assert all(a + b > max(lengths) for i, a in enumerate(lengths) for b in lengths[i + 1 :])
        return
    with torch.inference_mode():
        padded = model(input_ids=input_ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        packed = packing.forward(model).last_hidden_state  # (B, T, d)
    rows, width = packing.inputs["input_ids"].shape
    assert width == max(lengths) and rows < len(lengths)  # never longer rows, fewer of them
    real = mask.bool()
    torch.testing.assert_close(packed[real], padded[real], atol=tolerance, rtol=tolerance)
    assert not packed[~real].any()


def test_a_family_that_cannot_pack_runs_its_padded_batch(tiny_checkpoints):
    """LLaMA takes no packed rows here: forward(packed=True) is the padded pass, bit for bit."""
    checkpoint = load_checkpoint(str(tiny_checkpoints["llama"]))
    batch = batch_from_ids(checkpoint, [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]])
    assert pack(checkpoint.adapter, batch.input_ids, batch.mask) is None
    assert torch.equal(forward(checkpoint, batch, packed=True).logits, forward(checkpoint, batch).logits)


def test_the_tiny_berts_packed_forward_matches_its_padded_one(tiny_checkpoints):
    """Through capture.forward on a loaded checkpoint: short inputs share rows of the longest's width."""
    checkpoint = load_checkpoint(str(tiny_checkpoints["bert"]))
    batch = batch_from_ids(checkpoint, [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [16]])
    packing = pack(checkpoint.adapter, batch.input_ids, batch.mask)
    assert packing is not None and packing.inputs["input_ids"].shape == (2, 6)  # 6 | 3 + 2 + 1
    expected = forward(checkpoint, batch).last_hidden_state
    got = forward(checkpoint, batch, packed=True).last_hidden_state
    torch.testing.assert_close(got[batch.mask], expected[batch.mask], atol=2e-5, rtol=1e-5)


@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_packed_rows_place_every_input_once_within_the_longests_width(lengths):
    rows = packed_rows(lengths)
    width = max(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    fill = [sum(lengths[i] for i in row) for row in rows]
    assert max(fill) <= width
    assert sum(2 * f <= width for f in fill) <= 1  # at most one row half full or less
