from __future__ import annotations

import pytest
import torch

from ann_mlp.approx_mlp import ApproxMLP, augmented_keys, dense_activations
from ann_mlp.capture import forward, make_batch
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.checkpoint.base import MlpWeights
from ann_mlp.errors import InputError
from ann_mlp.index import build_index
from ann_mlp.patch import patched

TEXTS = ["Return the sum of a and b, raising TypeError on strings.", "A short one."]


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("backend", ["exact", "ivf", "pq"])
def test_full_k_exhaustive_equals_exact_model(tiny_checkpoint, backend):
    """k = d_ff with an exhaustive search reproduces the model, for every family."""
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    batch = make_batch(checkpoint, TEXTS, 64)
    exact = _output(forward(checkpoint, batch))
    mlps = {}
    for layer in range(checkpoint.num_layers):
        weights = checkpoint.adapter.mlp_weights(layer)
        index = build_index(backend, augmented_keys(weights))
        effort = {} if backend == "exact" else {index.effort_param: index.effort_range(weights.d_ff)[1]}
        mlps[layer] = ApproxMLP(weights, index, k=weights.d_ff, search_params=effort)
    with patched(checkpoint.adapter, mlps):
        approx = _output(forward(checkpoint, batch))
    assert _rel(approx, exact) < 1e-5
    # unpatched: the original modules are back
    torch.testing.assert_close(_output(forward(checkpoint, batch)), exact, rtol=0, atol=0)


# Relative error allowed at k = d_ff against the model's own forward in its dtype: 4 units of
# rounding of the dtype (bfloat16 keeps 8 significant bits, float16 11). The approximate path
# scores in float32 and sums values in the model's dtype; the dense model rounds at every step.
HALF_TOLERANCE = {"bfloat16": 4 * 2**-8, "float16": 4 * 2**-11}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_full_k_equals_a_half_precision_model_within_its_rounding(half_checkpoints, monkeypatch, family, dtype):
    """A bfloat16 or float16 checkpoint runs in its dtype (float16 as on a CPU with float16
    arithmetic), and k = d_ff with an exhaustive search reproduces it to the dtype's rounding."""
    from ann_mlp import checkpoint as checkpoints

    monkeypatch.setattr(checkpoints, "cpu_has_float16_arithmetic", lambda: True)
    checkpoint = load_checkpoint(str(half_checkpoints[family, dtype]))
    batch = make_batch(checkpoint, TEXTS, 64)
    exact = _output(forward(checkpoint, batch))
    assert exact.dtype == getattr(torch, dtype)
    mlps = {}
    for layer in range(checkpoint.num_layers):
        weights = checkpoint.adapter.mlp_weights(layer)
        mlps[layer] = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=weights.d_ff)
        assert mlps[layer].value_rows.dtype == getattr(torch, dtype)  # no float32 copy of the values
    with patched(checkpoint.adapter, mlps):
        approx = _output(forward(checkpoint, batch))
    assert approx.dtype == exact.dtype
    assert _rel(approx.float(), exact.float()) < HALF_TOLERANCE[dtype]


def test_layer_output_matches_the_family_module(tiny_checkpoints):
    """One ApproxMLP against the model's own MLP module on the same input (gated and not)."""
    for family in ("gpt2", "llama"):
        checkpoint = load_checkpoint(str(tiny_checkpoints[family]))
        weights = checkpoint.adapter.mlp_weights(0)
        mlp = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=weights.d_ff)
        module = checkpoint.model.get_submodule(checkpoint.adapter.mlp_input_path(0))
        x = torch.randn(2, 5, weights.d_model)
        with torch.no_grad():
            assert _rel(mlp(x), module(x)) < 1e-5
            assert mlp(x).shape == x.shape


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_one_tokens_value_sum_shared_among_threads_is_the_plain_sum(threads):
    """A single token's value sum, cut into one bag per thread, equals the weighted sum of its rows
    (to float32 summation order),
    for a k that splits evenly among the bags and one that does not."""
    torch.manual_seed(0)
    table = torch.randn(1024, 48)
    weights = MlpWeights(keys=torch.randn(1024, 48), key_bias=None, values=table, out_bias=None, activation="relu")
    mlp = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=512)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k in (512, 389, 64):
            ids = torch.randperm(1024)[:k][None]  # (1, k)
            weights = torch.randn(1, k)
            expected = weights @ table[ids[0]]  # (1, 48)
            torch.testing.assert_close(mlp.weighted_value_sum(ids, weights), expected, rtol=1e-4, atol=1e-4)
        two = torch.randint(0, 1024, (2, 300)), torch.randn(2, 300)  # two tokens: one bag each
        expected = torch.stack([two[1][i] @ table[two[0][i]] for i in range(2)])
        torch.testing.assert_close(mlp.weighted_value_sum(*two), expected, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(saved)


def test_small_k_keeps_only_the_top_k_neurons(tiny_checkpoints):
    checkpoint = load_checkpoint(str(tiny_checkpoints["opt"]))
    weights = checkpoint.adapter.mlp_weights(0)
    k = 8
    mlp = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=k)
    x = torch.randn(4, weights.d_model)
    scores = x @ weights.keys.T + weights.key_bias  # (4, d_ff)
    kept = torch.zeros_like(scores).scatter(1, scores.topk(k, dim=1).indices, 1.0)
    expected = (torch.relu(scores) * kept) @ weights.values + weights.out_bias
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)
    assert mlp.stats.queries == 4 and mlp.stats.keys_scored == 4 * weights.d_ff


def test_k_outside_range_is_refused(tiny_checkpoints):
    checkpoint = load_checkpoint(str(tiny_checkpoints["bert"]))
    weights = checkpoint.adapter.mlp_weights(0)
    index = build_index("exact", augmented_keys(weights))
    for k in (0, weights.d_ff + 1):
        with pytest.raises(InputError, match="k must be in"):
            ApproxMLP(weights, index, k=k)


def test_approximate_scores_reach_the_activation_as_the_index_returns_them(tiny_checkpoints):
    """An index built to score in 8 bits (lowrank, kept_bits=8) is not re-scored from the float32
    keys: the layer is exactly act(returned scores) times the returned value rows, and close to
    the same selection scored exactly."""
    for family in ("opt", "llama"):
        weights = load_checkpoint(str(tiny_checkpoints[family])).adapter.mlp_weights(0)
        keys = augmented_keys(weights)
        calibration = torch.randn(400, weights.d_model)
        queries = torch.cat([calibration, torch.ones(400, 1)], 1).numpy()
        index = build_index("lowrank", keys, queries=queries, k=12, rank=8, rerank_bits=8, kept_bits=8)
        assert not index.exact_scores
        mlp = ApproxMLP(weights, index, k=12)
        x = torch.randn(6, weights.d_model)
        with torch.inference_mode():
            out, kept, result = mlp.forward_with_selection(x)
        assert torch.equal(kept, torch.from_numpy(result.ids))
        activations = mlp.act(torch.from_numpy(result.scores))  # (6, 12)
        if weights.gated:
            activations = activations * (x @ weights.up.T).gather(1, kept)
        expected = (activations[..., None] * mlp.value_rows[kept]).sum(1)
        if weights.out_bias is not None:
            expected = expected + weights.out_bias
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
        exact_scores = (x @ weights.keys.T + (0 if weights.key_bias is None else weights.key_bias)).gather(1, kept)
        assert (torch.from_numpy(result.scores) - exact_scores).abs().max() < 0.05 * exact_scores.abs().max()


def test_candidates_keep_the_largest_contributions(tiny_checkpoints):
    """Gated: retrieving every neuron and keeping the k largest |act(g)*u| is the oracle selection;
    the layer output is exactly the sum over those k, and it beats the top k by gate score."""
    weights = load_checkpoint(str(tiny_checkpoints["llama"])).adapter.mlp_weights(0)
    x = torch.randn(6, weights.d_model)
    _, activations = dense_activations(weights, x)  # (6, d_ff)
    k = 8
    by_gate = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=k)
    by_contribution = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=k)
    by_contribution.candidates = weights.d_ff
    with torch.inference_mode():
        out, kept, result = by_contribution.forward_with_selection(x)
    oracle = activations.abs().topk(k, dim=1).indices  # (6, k)
    assert torch.equal(kept.sort(dim=1).values, oracle.sort(dim=1).values)
    expected = activations.gather(1, oracle)[..., None].mul(by_contribution.value_rows[oracle]).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    exact = activations @ by_gate.value_rows
    with torch.inference_mode():
        gate_error = (by_gate(x) - exact).norm()
    assert (out - exact).norm() < gate_error
    # the up rows read only to choose are counted: d_ff - k of them per token
    assert result.bytes_read == 6 * (by_contribution.index.full_scan_bytes + (weights.d_ff - k) * weights.d_model * 4)


@pytest.mark.parametrize(("n_queries", "selected"), [(1, 7), (3, 40), (16, 7), (16, 30)])
def test_rows_dot_scores_each_querys_own_rows(n_queries, selected):
    """Scored in place (few rows or few queries) or by one matmul then a gather (16 queries of
    30 of 50 rows): the same inner products."""
    from ann_mlp.linalg import rows_dot

    rows, x = torch.randn(50, 12), torch.randn(n_queries, 12)
    ids = torch.stack([torch.randperm(50)[:selected] for _ in range(n_queries)])  # (N, selected)
    torch.testing.assert_close(rows_dot(rows, ids, x), (x @ rows.T).gather(1, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("max_gathered", [1 << 22, 7 * 12, 1])
def test_rows_dot_gathers_16_bit_rows_a_chunk_of_queries_at_a_time(max_gathered):
    """bfloat16 rows, gathered for one query at a time (7 rows of 12), a few, or all at once: the
    float32 inner products of the same rows."""
    from ann_mlp.linalg import rows_dot

    rows, x = torch.randn(50, 12).bfloat16(), torch.randn(9, 12)
    ids = torch.stack([torch.randperm(50)[:7] for _ in range(9)])  # (9, 7)
    expected = (x @ rows.float().T).gather(1, ids)
    torch.testing.assert_close(rows_dot(rows, ids, x, max_gathered), expected, rtol=1e-5, atol=1e-5)


def test_row_codes_score_selected_rows_within_their_rounding():
    """8-bit codes of a table's rows score each query's own rows as their decoded rows do (gathered
    for a few selections, decoded once for many), within half a code step per dimension of the exact
    inner products."""
    from ann_mlp.linalg import RowCodes

    rows, x = torch.randn(50, 12) * torch.linspace(0.1, 3, 12), torch.randn(4, 12)
    codes = RowCodes.encode(rows.numpy())
    ids = torch.randint(0, 50, (4, 7))
    scores = codes.dot(ids, x)  # (4, 7)
    torch.testing.assert_close(scores, (x @ codes.decode().T).gather(1, ids), rtol=1e-5, atol=1e-5)
    exact = (x @ rows.T).gather(1, ids)
    assert ((scores - exact).abs() <= (x.abs() @ codes.step)[:, None] / 2 + 1e-5).all()
    assert (scores - exact).abs().max() > 1e-6  # coded, not exact
    many = torch.randint(0, 50, (4, 40))  # selections outnumbering the rows: decoded once, not gathered
    torch.testing.assert_close(codes.dot(many, x), (x @ codes.decode().T).gather(1, many), rtol=1e-5, atol=1e-5)


def test_4_bit_row_codes_decode_as_faiss_does_and_score_within_their_rounding():
    """4-bit codes (two dimensions per byte, an odd dimension count padded) decode to faiss' own
    QT_4bit reconstruction; selected and all rows score as the decoded rows do, within half a step
    (range / 15) per dimension, and the rounding variance is step² / 12 per dimension."""
    import faiss

    from ann_mlp.linalg import RowCodes

    rows, x = torch.randn(60, 13) * torch.linspace(0.1, 3, 13), torch.randn(4, 13)
    codes = RowCodes.encode(rows.numpy(), bits=4)
    assert codes.codes.shape == (60, 7) and codes.bits == 4
    quantizer = faiss.ScalarQuantizer(13, faiss.ScalarQuantizer.QT_4bit)
    quantizer.train(rows.numpy())
    torch.testing.assert_close(codes.decode(), torch.from_numpy(quantizer.decode(codes.codes.numpy())))
    decoded_scores = x @ codes.decode().T  # (4, 60)
    torch.testing.assert_close(codes.dot_all(x), decoded_scores, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, 60, (4, 7))
    torch.testing.assert_close(codes.dot(ids, x), decoded_scores.gather(1, ids), rtol=1e-5, atol=1e-5)
    step = (rows.max(0).values - rows.min(0).values) / 15
    torch.testing.assert_close(codes.step, step)
    assert ((decoded_scores - x @ rows.T).abs() <= (x.abs() @ step)[:, None] / 2 + 1e-5).all()
    torch.testing.assert_close(codes.noise_variance, step.square() / 12)


def test_up_codes_choose_as_the_exact_up_does_for_a_quarter_of_the_bytes(tiny_checkpoints):
    """Gated: choosing the k largest |act(g)*u| among the candidates with u estimated from 8-bit codes
    of the up rows keeps the neurons the exact up keeps (ties aside); the k kept get their exact up, so
    the output is the exact sum over them; choosing reads one byte per candidate and dimension instead
    of the four bytes of every candidate not kept."""
    from ann_mlp.linalg import RowCodes

    weights = load_checkpoint(str(tiny_checkpoints["llama"])).adapter.mlp_weights(0)
    x = torch.randn(6, weights.d_model)
    k, d_ff, d_model = 8, weights.d_ff, weights.d_model
    codes = RowCodes.encode(weights.up.float().numpy())
    index = build_index("exact", augmented_keys(weights))
    by_exact_up = ApproxMLP(weights, index, k=k, candidates=d_ff)
    by_codes = ApproxMLP(
        weights, index, k=k, candidates=d_ff, up_codes=codes.codes, up_ranges=torch.from_numpy(codes.ranges)
    )
    with torch.inference_mode():
        _, kept_exactly, exact_result = by_exact_up.forward_with_selection(x)
        out, kept, result = by_codes.forward_with_selection(x)
    same = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(kept, kept_exactly)]
    assert sum(same) >= 0.95 * kept.numel(), same
    _, activations = dense_activations(weights, x)  # (6, d_ff)
    expected = activations.gather(1, kept)[..., None].mul(by_codes.value_rows[kept]).sum(1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert result.bytes_read == 6 * (index.full_scan_bytes + d_ff * d_model)
    assert exact_result.bytes_read == 6 * (index.full_scan_bytes + (d_ff - k) * d_model * 4)


def test_tail_of_dropped_means_is_unbiased_on_its_tokens(tiny_checkpoints):
    """Each neuron's mean over the tokens that leave it out of their top-k makes the corrected output
    right on average over those tokens; the plain mean (which also counts the tokens where the neuron
    fires and is retrieved) leaves a bias."""
    from ann_mlp.build import LayerCalibration, dropped_mean

    weights = load_checkpoint(str(tiny_checkpoints["bert"])).adapter.mlp_weights(0)
    x = 3 * torch.randn(512, weights.d_model, generator=torch.Generator().manual_seed(0))
    k = 8
    _, activations = dense_activations(weights, x)  # (512, d_ff)

    def mean_residual(tail_mean: torch.Tensor) -> float:
        mlp = ApproxMLP(weights, build_index("exact", augmented_keys(weights)), k=k, tail_mean=tail_mean)
        exact = activations @ mlp.value_rows + weights.out_bias
        with torch.inference_mode():
            return float((mlp(x) - exact).mean(0).norm() / exact.norm(dim=1).mean())

    conditional, plain = (
        mean_residual(dropped_mean(LayerCalibration(weights, x), k)),
        mean_residual(activations.mean(0)),
    )
    assert conditional < 1e-5 and plain > 100 * conditional, (conditional, plain)


def test_tail_map_by_default_only_where_the_dropped_neurons_are_not_zero():
    """Rank 16 (at most d_model) for ReLU, GELU and gated layers; none for Top-k and thresholded
    ones, whose dropped neurons are exactly zero."""
    from ann_mlp.build import default_tail_map_rank
    from ann_mlp.checkpoint.base import MlpWeights

    def layer(d_model: int, d_ff: int, **kind) -> MlpWeights:
        return MlpWeights(
            keys=torch.zeros(d_ff, d_model),
            key_bias=None,
            values=torch.zeros(d_ff, d_model),
            out_bias=None,
            **{"activation": "relu", **kind},
        )

    assert default_tail_map_rank(layer(256, 4096)) == 16
    assert default_tail_map_rank(layer(384, 1536, activation="gelu")) == 16
    assert default_tail_map_rank(layer(8, 96)) == 8  # at most d_model
    assert default_tail_map_rank(layer(256, 4096, topk=128)) == 0
    assert default_tail_map_rank(layer(256, 4096, threshold=0.1)) == 0
