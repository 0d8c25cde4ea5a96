"""The decode loop: the same tokens as transformers' generate(), batches equal to single prompts,
stops, sampling, deadlines; and `bench decode`'s report on a tiny store."""

from __future__ import annotations

import json
import time

import pytest
import torch

from ann_mlp.approx_model import ApproxModel
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.decode import DecodeBatch, Sampling, Sequence, generate, left_padded, next_tokens, until
from ann_mlp.decode_bench import agreement, bench_decode
from ann_mlp.errors import DeadlineError, InputError

CAUSAL = ("gpt2", "opt", "llama", "qwen2")
PROMPTS = [[5, 9, 14, 20, 33, 41], [7, 8], [100, 3, 60, 61]]


@pytest.fixture(scope="module", params=CAUSAL)
def causal(request, tiny_checkpoints):
    return load_checkpoint(str(tiny_checkpoints[request.param]))


def reference(checkpoint, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy generate() for one prompt, no end-of-sequence stop."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = checkpoint.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_tokens_equal_transformers_generate(causal):
    for prompt in PROMPTS:
        (continuation,) = generate(causal.model, [prompt], 12, eos_token_id=None, pad_token_id=0)
        assert continuation.tokens == reference(causal, prompt, 12)
        assert continuation.finish_reason == "length"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_bfloat16_greedy_tokens_equal_transformers_generate(half_checkpoints, family):
    """A bfloat16 checkpoint decodes in its dtype with the tokens of generate() on the same model."""
    checkpoint = load_checkpoint(str(half_checkpoints[family, "bfloat16"]))
    for prompt in PROMPTS:
        (continuation,) = generate(checkpoint.model, [prompt], 12, eos_token_id=None, pad_token_id=0)
        assert continuation.tokens == reference(checkpoint, prompt, 12)


def test_a_batch_of_unequal_prompts_decodes_each_as_alone(causal):
    together = generate(causal.model, PROMPTS, 10, eos_token_id=None, pad_token_id=0, keep_logprobs=True)
    for prompt, batched in zip(PROMPTS, together):
        (alone,) = generate(causal.model, [prompt], 10, eos_token_id=None, pad_token_id=0, keep_logprobs=True)
        assert batched.tokens == alone.tokens
        torch.testing.assert_close(torch.stack(batched.logprobs), torch.stack(alone.logprobs), atol=1e-4, rtol=1e-4)


def test_sequences_that_join_and_leave_between_steps_decode_each_as_alone(causal):
    """A decode batch shared over time: rows join mid-generation (longer and shorter than the
    batch's cache), one leaves early (its length), one is dropped (its caller left); every
    finished row has the tokens it has alone, and logprobs equal up to summation order."""
    lengths = {0: 9, 1: 3, 2: 8, 3: 6}
    prompts = {0: PROMPTS[1], 1: PROMPTS[0], 2: [4] * 11, 3: PROMPTS[2]}
    rows = {i: Sequence(prompts[i], lengths[i], keep_logprobs=True) for i in prompts}
    batch = DecodeBatch(causal.model, pad_token_id=0)
    batch.join([rows[0]])
    batch.step()
    batch.join([rows[1], rows[2]])  # a longer and a shorter prompt than the batch's length
    batch.step()
    batch.join([rows[3]])
    dropped = Sequence(PROMPTS[0], 20)
    batch.join([dropped])
    batch.step()
    batch.leave([dropped])
    while batch.rows:
        batch.step()
    assert batch.cache is None and all(rows[i].done for i in rows)
    for i, row in rows.items():
        (alone,) = generate(
            causal.model, [prompts[i]], lengths[i], eos_token_id=None, pad_token_id=0, keep_logprobs=True
        )
        assert row.continuation.tokens == alone.tokens
        torch.testing.assert_close(
            torch.stack(row.continuation.logprobs), torch.stack(alone.logprobs), atol=1e-4, rtol=1e-4
        )
    assert 0 < len(dropped.continuation.tokens) < 20


def test_end_of_sequence_stops_one_sequence_and_is_not_returned(causal):
    (free,) = generate(causal.model, [PROMPTS[0]], 8, eos_token_id=None, pad_token_id=0)
    eos = free.tokens[3]  # pretend the fourth greedy token ends the sequence
    first = free.tokens.index(eos)
    stopped, other = generate(causal.model, [PROMPTS[0], PROMPTS[1]], 8, eos_token_id=eos, pad_token_id=0)
    assert stopped.tokens == free.tokens[:first] and stopped.finish_reason == "stop"
    assert eos not in other.tokens and len(other.tokens) <= 8


def test_seeded_sampling_repeats_and_a_tiny_top_p_is_greedy(causal):
    sampled = Sampling(temperature=1.5, top_p=0.95, seed=7)
    first = generate(causal.model, PROMPTS, 10, eos_token_id=None, pad_token_id=0, sampling=sampled)
    again = generate(causal.model, PROMPTS, 10, eos_token_id=None, pad_token_id=0, sampling=sampled)
    assert [c.tokens for c in first] == [c.tokens for c in again]
    greedy = generate(causal.model, PROMPTS, 10, eos_token_id=None, pad_token_id=0)
    nucleus = generate(
        causal.model,
        PROMPTS,
        10,
        eos_token_id=None,
        pad_token_id=0,
        sampling=Sampling(temperature=1.0, top_p=1e-6, seed=1),
    )
    assert [c.tokens for c in nucleus] == [c.tokens for c in greedy]


def test_next_tokens_at_a_vanishing_temperature_is_argmax():
    logits = torch.tensor([[0.0, 3.0, 2.9], [1.0, -1.0, 0.5]])
    assert next_tokens(logits, Sampling(temperature=5e-324), None).tolist() == [1, 0]


def test_left_padding_and_its_mask():
    ids, mask = left_padded([[4, 5, 6], [7]], pad_token_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left_padded([[4, 5], [6, 7]], pad_token_id=0)[1] is None  # nothing padded: no mask at all


def test_a_passed_deadline_stops_between_steps(causal, monkeypatch):
    with pytest.raises(DeadlineError, match="0 of 5"):
        generate(causal.model, [PROMPTS[0]], 5, eos_token_id=None, pad_token_id=0, stop=until(time.monotonic() - 1))
    clock = [0.0]  # a clock that advances one second per forward call
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    with pytest.raises(DeadlineError, match="3 of 50"):
        generate(
            causal.model,
            [PROMPTS[0]],
            50,
            eos_token_id=None,
            pad_token_id=0,
            stop=until(2.5),
            on_step=lambda: clock.__setitem__(0, clock[0] + 1),
        )


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(seed=2**64)])
def test_sampling_rejects_out_of_range_values(bad):
    with pytest.raises(InputError):
        Sampling(**bad)


def test_agreement_counts_positions_that_match():
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.75


def test_bench_decode_reports_consistent_fields(tiny_stores):
    model = ApproxModel.open(tiny_stores["tiny-llama"])
    result = bench_decode(model, new_tokens=6, batch=2, prompts=3, prompt_tokens=8, turns=2)
    report = json.loads(json.dumps(result.to_json()))
    for field in (
        "model",
        "batch",
        "new_tokens",
        "exact_tokens_per_s",
        "approx_tokens_per_s",
        "auto_tokens_per_s",
        "approx_speedup",
        "auto_speedup",
        "continuation_agreement",
        "kl_mean",
    ):
        assert field in report
    assert report["model"] == "tiny-llama" and report["batch"] == 2 and report["prompts"] == 3
    assert all(report[f"{mode}_tokens_per_s"] > 0 for mode in ("exact", "approx", "auto", "generate"))
    assert 0 <= report["continuation_agreement"] <= 1 and 0 <= report["auto_continuation_agreement"] <= 1
    assert report["kl_mean"] >= -1e-6 and report["perplexity_exact"] > 1 and report["perplexity_approx"] > 1
    for split in report["split"].values():
        parts = split["index_search_ms"] + split["mlp_rest_ms"] + split["attention_ms"] + split["other_ms"]
        assert split["total_ms"] == pytest.approx(parts, abs=2e-3)
        assert split["attention_ms"] > 0 and split["mlp_rest_ms"] > 0
    assert report["split"]["approx"]["index_search_ms"] > 0 and report["split"]["exact"]["index_search_ms"] == 0


def test_bench_decode_refuses_an_encoder_and_a_context_it_cannot_hold(tiny_stores):
    with pytest.raises(InputError, match="causal LM"):
        bench_decode(ApproxModel.open(tiny_stores["tiny-bert"]))
    with pytest.raises(InputError, match="positions"):
        bench_decode(ApproxModel.open(tiny_stores["tiny-llama"]), new_tokens=250, prompt_tokens=32)
    # llama.cpp runs on the store's own GGUF file, which a safetensors checkpoint does not have
    with pytest.raises(InputError, match="build the store from a .gguf checkpoint"):
        bench_decode(ApproxModel.open(tiny_stores["tiny-llama"]), new_tokens=2, prompts=1, turns=1, llama_cpp=True)


def test_cli_bench_decode_prints_the_table_and_appends_json(tiny_stores, tmp_path):
    from typer.testing import CliRunner

    from ann_mlp.cli import app

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The first prompt of several words.\n\nAnother prompt, the second.\n\nA third one.\n")
    out = tmp_path / "decode.jsonl"
    args = [
        "bench",
        "decode",
        str(tiny_stores["tiny-llama"]),
        "--prompts",
        str(prompts),
        "--num-prompts",
        "2",
        "--new-tokens",
        "5",
        "--turns",
        "2",
        "--json",
        str(out),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 prompts" in result.output and "generate()" in result.output
    for path in ("exact", "approx", "auto"):
        assert any(line.split()[:1] == [path] for line in result.output.splitlines())
    record = json.loads(out.read_text().splitlines()[-1])
    assert record["prompts"] == 2 and record["new_tokens"] == 5 and record["text"].startswith(str(prompts))
    bad = CliRunner().invoke(app, ["bench", "decode", str(tiny_stores["tiny-bert"]), "--json", str(out)])
    assert bad.exit_code != 0 and "causal LM" in str(bad.exception)


def test_bench_decode_needs_prompts_to_fill_its_batch(tiny_stores):
    with pytest.raises(InputError, match="cannot fill a batch of 4"):
        bench_decode(ApproxModel.open(tiny_stores["tiny-llama"]), new_tokens=2, batch=4, prompts=3, turns=1)
