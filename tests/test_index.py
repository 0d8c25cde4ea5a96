"""Backend contract: every backend against the exact ground truth."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from ann_mlp.errors import BackendError
from ann_mlp.index import BACKENDS, KeyRowsIndex, backend_class, build_index
from ann_mlp.metrics import recall_at_k
from ann_mlp.tuning import measure, tune_effort

NUM_KEYS, DIM, K = 512, 33, 16
# Build parameters that change how a backend searches, held to the same contract as the backends.
VARIANTS = {
    "lowrank-margin": ("lowrank", {"margin_rank": 8}),
    "lowrank-4bit-margin": ("lowrank", {"margin_rank": 8, "code_bits": 4}),
}
APPROXIMATE = [name for name in BACKENDS if name != "exact"] + list(VARIANTS)


def _require_backend(name: str) -> None:
    """Skip when `name` is an optional backend whose extra is not installed (only scann is)."""
    if name == "scann":
        pytest.importorskip("scann", reason="optional backend scann is not installed")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # Keys with a spread of norms and a bias column, as MLP keys [k; b] are.
    keys = rng.standard_normal((NUM_KEYS, DIM)).astype(np.float32) * rng.uniform(0.5, 2, (NUM_KEYS, 1)).astype(
        np.float32
    )
    queries = rng.standard_normal((1200, DIM)).astype(np.float32)
    queries[:, -1] = 1.0
    # the first 1000 queries calibrate query-aware backends; tests search the other 200
    return keys, queries[1000:], torch.from_numpy(queries[1000:]) @ torch.from_numpy(keys).T, queries[:1000]


_BUILT: dict[str, object] = {}


def _index(name, data):
    """Each backend is built once per module (the dejavu predictor trains for seconds); tests
    get it back with no search parameters set."""
    _require_backend(name)
    if name not in _BUILT:
        backend, params = VARIANTS.get(name, (name, {}))
        _BUILT[name] = build_index(backend, data[0], queries=data[3], k=K, **params)
    index = _BUILT[name]
    index.search_params = {}
    return index


def test_exact_backend_is_the_ground_truth(data):
    keys, queries, truth, _ = data
    result = build_index("exact", keys).search(queries, K)
    assert recall_at_k(truth, torch.from_numpy(result.ids), K).min() == 1.0
    torch.testing.assert_close(torch.from_numpy(result.scores), truth.topk(K, dim=1).values)


@pytest.mark.parametrize("name", APPROXIMATE)
def test_full_effort_recovers_the_exact_top_k(data, name):
    keys, queries, truth, _ = data
    index = _index(name, data)
    point = measure(index, queries, truth, K, index.effort_range(K)[1])
    assert point.recall >= 0.97, (str(index), point)
    result = index.search(queries, K)
    assert result.ids.shape == (len(queries), K) and result.ids.dtype == np.int64
    assert index.exact_scores
    # returned scores are the true inner products of the returned keys
    found = result.ids >= 0
    true_scores = truth.gather(1, torch.from_numpy(result.ids).clamp_min(0)).numpy()
    np.testing.assert_allclose(result.scores[found], true_scores[found], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("name", APPROXIMATE)
def test_effort_trades_scanning_for_recall(data, name):
    keys, queries, truth, _ = data
    index = _index(name, data)
    lo, hi = index.effort_range(K)
    low, high = measure(index, queries, truth, K, lo), measure(index, queries, truth, K, hi)
    assert low.recall <= high.recall
    assert low.bytes_read_fraction < high.bytes_read_fraction
    assert 0 < low.scanned_fraction <= high.scanned_fraction
    if name != "hnsw":  # a graph walk can compute more distances than there are keys
        assert high.scanned_fraction <= 1.0 + 1e-9


@pytest.mark.parametrize("name", APPROXIMATE)
def test_slots_without_a_key_are_marked_not_filled(data, name):
    """At the least effort, k = 4 K is more than some backends reach: the slots they leave
    empty are id -1 with the lowest score, -inf or faiss' -FLT_MAX (ScaNN's own filler is
    id 0 with score NaN, which would reach the model as a neuron)."""
    keys, queries, truth, _ = data
    index = _index(name, data)
    k = 4 * K
    result = index.search(queries, k, **{index.effort_param: index.effort_range(k)[0]})
    assert result.ids.shape == result.scores.shape == (len(queries), k)
    assert not np.isnan(result.scores).any()
    empty = result.ids < 0
    assert (result.scores[empty] <= np.finfo(np.float32).min).all()
    for row in result.ids:
        found = row[row >= 0]
        assert len(np.unique(found)) == len(found)  # no key twice
    if name == "scann":
        assert empty.any()  # the case this guards: one leaf of 32 holds fewer than 4 K keys


@pytest.mark.parametrize("name", APPROXIMATE)
def test_tuning_finds_the_smallest_effort_reaching_the_target(data, name):
    keys, queries, truth, _ = data
    index = _index(name, data)
    point = tune_effort(index, queries, truth, K, 0.9)
    assert point.recall >= 0.9
    if point.effort > index.effort_range(K)[0]:
        assert measure(index, queries, truth, K, point.effort - 1).recall < 0.9


@pytest.mark.parametrize("name", [*BACKENDS, *VARIANTS])
def test_save_load_round_trip(data, name, tmp_path):
    keys, queries, _, _ = data
    index = _index(name, data)
    index.search_params = {index.effort_param: index.effort_range(K)[0]} if name != "exact" else {}
    files = index.save(tmp_path, "layer_000")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == sorted(files)
    held_keys = keys.copy()
    loaded = type(index).load(tmp_path, "layer_000", held_keys, index.build_params, index.search_params)
    np.testing.assert_array_equal(loaded.search(queries, K).ids, index.search(queries, K).ids)
    assert str(loaded) == str(index)
    if isinstance(index, KeyRowsIndex):  # the keys are the checkpoint's: neither saved nor copied
        assert not any(np.load(tmp_path / f).shape == keys.shape for f in files if f.endswith(".npy"))
        assert loaded.keys.data_ptr() == held_keys.ctypes.data


@pytest.mark.parametrize("name", ["hnsw", "pq"])
def test_faiss_flat_storage_is_lent_as_the_key_table(data, name, tmp_path):
    """HNSW's and PQ-refine's full-precision keys are the table the model's parameters point
    into: it keeps the faiss index alive, and a file whose keys differ is refused."""
    keys = data[0]
    index = build_index(name, keys)
    index.save(tmp_path, "layer_000")
    owner = weakref.ref(index.index)
    table = index.key_table().numpy()  # (n, >= DIM), PQ's padded with zero columns
    np.testing.assert_array_equal(table[:, :DIM], keys)
    assert not table[:, DIM:].any()
    del index
    gc.collect()
    assert owner() is not None  # the table holds the index that owns its memory
    del table
    gc.collect()
    assert owner() is None
    other = keys.copy()
    other[3, 5] += 1
    with pytest.raises(BackendError, match="not the checkpoint's"):
        backend_class(name).load(
            tmp_path, "layer_000", other, {**BACKENDS[name].default_build_params(*keys.shape), "dim": DIM}, {}
        )


def test_ivf_lists_are_views_of_one_table_in_list_order(data, tmp_path):
    """IVF-Flat's lists hold no keys of their own: each is a view of its rows of one contiguous
    table, which is what the model borrows, and faiss searches it as it searched its own lists.
    The table outlives the index; a file whose keys differ is refused."""
    import faiss

    keys, queries = data[0], data[1]
    index = build_index("ivf", keys)
    table, order = index.key_table().numpy(), index.table_order()  # (n, DIM) in list order, (n,)
    assert table.flags.c_contiguous and sorted(order) == list(range(len(keys)))
    np.testing.assert_array_equal(table, keys[order])
    lists = faiss.downcast_InvertedLists(index.ivf.invlists)
    assert not any(lists.codes.at(i).is_owned for i in range(lists.nlist))
    # faiss' own IVF-Flat, trained and filled the same way, owning its lists: the same results
    own = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, index.ivf.nlist, faiss.METRIC_INNER_PRODUCT)
    own.cp.min_points_per_centroid = 1
    own.train(keys)
    own.add(keys)
    for nprobe in (1, 3, index.ivf.nlist):
        scores, ids = own.search(queries, K, params=faiss.SearchParametersIVF(nprobe=nprobe))
        result = index.search(queries, K, nprobe=nprobe)
        np.testing.assert_array_equal(result.ids, ids)
        np.testing.assert_array_equal(result.scores, scores)
    index.save(tmp_path, "layer_000")
    del index
    gc.collect()
    np.testing.assert_array_equal(table, keys[order])  # still readable: numpy owns it
    other = keys.copy()
    other[3, 5] += 1
    with pytest.raises(BackendError, match="not the checkpoint's"):
        backend_class("ivf").load(tmp_path, "layer_000", other, {}, {})


def test_load_refuses_keys_of_another_size(data, tmp_path):
    index = _index("ivf", data)
    index.save(tmp_path, "layer_000")
    with pytest.raises(BackendError, match="keys"):
        type(index).load(tmp_path, "layer_000", data[0][:-1], index.build_params, index.search_params)


def test_query_aware_backend_needs_calibration_queries(data):
    with pytest.raises(BackendError, match="calibration queries"):
        build_index("cells", data[0])


def test_query_cells_learns_where_queries_go():
    """Queries near calibration queries find their top-k among few candidates; key-space IVF does not."""
    rng = np.random.default_rng(1)
    keys = rng.standard_normal((1024, DIM)).astype(np.float32)
    modes = rng.standard_normal((8, DIM)).astype(np.float32) * 3  # queries come from 8 contexts

    def draw(n):
        q = modes[rng.integers(0, 8, n)] + 0.3 * rng.standard_normal((n, DIM)).astype(np.float32)
        q[:, -1] = 1.0
        return q

    calibration, test = draw(2000), draw(300)
    truth = torch.from_numpy(test) @ torch.from_numpy(keys).T
    cells = build_index("cells", keys, queries=calibration, k=K)
    point = measure(cells, test, truth, K, 4 * K)
    assert point.recall > 0.95 and point.bytes_read_fraction < 0.25, point


@pytest.mark.parametrize("name", APPROXIMATE)
def test_str_names_build_and_search_parameters(data, name):
    index = _index(name, data)
    index.search_params = {index.effort_param: 3}
    text = str(index)
    assert f"{index.effort_param}=3" in text
    for param in index.build_params:
        assert f"{param}=" in text


def test_unknown_backend_and_search_parameter(data):
    with pytest.raises(BackendError, match="unknown backend"):
        build_index("annoy", data[0])
    index = build_index("ivf", data[0])
    with pytest.raises(BackendError, match="no search parameter efSearch"):
        index.search(data[1], K, efSearch=10)


def _low_dimensional_queries(rng, sizes, dim, used_dims):
    """Query sets that, like hidden states, vary along the same few directions (plus the constant 1)."""
    basis = rng.standard_normal((used_dims, dim - 1)).astype(np.float32)
    sets = []
    for n in sizes:
        q = np.ones((n, dim), dtype=np.float32)
        q[:, :-1] = rng.standard_normal((n, used_dims)).astype(np.float32) @ basis
        sets.append(q)
    return sets


def test_low_rank_fit_preserves_scores_where_the_queries_are():
    """Fit to the queries' second moment, rank 8 ranks neurons as the exact scores do for queries
    spanning 8 directions, which the keys' own best rank-8 approximation cannot."""
    from ann_mlp.index.low_rank_fit import score_preserving_factors

    rng = np.random.default_rng(2)
    keys = rng.standard_normal((1024, DIM)).astype(np.float32)
    calibration, test = _low_dimensional_queries(rng, (2000, 300), DIM, 7)
    truth = torch.from_numpy(test) @ torch.from_numpy(keys).T  # (300, 1024)
    a, b = score_preserving_factors(keys, calibration, rank=8)
    fitted = torch.from_numpy(test @ b.T @ a.T)
    u, s, vt = np.linalg.svd(keys, full_matrices=False)
    unweighted = torch.from_numpy(test @ (vt[:8].T * s[:8]) @ u[:, :8].T)
    assert torch.allclose(fitted, truth, atol=1e-3)
    assert recall_at_k(truth, unweighted.topk(K, dim=1).indices, K).mean() < 0.5

    index = build_index("lowrank", keys, queries=calibration, k=K, rank=8)
    point = measure(index, test, truth, K, 2 * K)
    assert point.recall > 0.97 and point.bytes_read_fraction < 0.35, point


def test_low_rank_picks_the_cheapest_rank_at_the_target_recall():
    from ann_mlp.index.low_rank_fit import candidate_ranks, rerank_needed, score_preserving_factors

    rng = np.random.default_rng(3)
    dim = 129
    keys = rng.standard_normal((2048, dim)).astype(np.float32)
    calibration, test = _low_dimensional_queries(rng, (2000, 300), dim, 14)
    index = build_index("lowrank", keys, queries=calibration, k=K, target_recall=0.95)
    assert candidate_ranks(dim) == [8, 16, 32, 40, 64]
    # 14 used directions + the constant: rank 8 ranks badly, 16 nearly exactly; more only costs bytes.
    assert index.build_params["rank"] == 16
    truth = torch.from_numpy(test) @ torch.from_numpy(keys).T
    keys_t, test_t = torch.from_numpy(keys), torch.from_numpy(test)
    needed = {}
    for rank in (8, 16):
        a, b = (torch.from_numpy(m) for m in score_preserving_factors(keys, calibration, rank))
        needed[rank] = rerank_needed(keys_t, a, b, test_t, K, 0.95)
    assert needed[16] == K and needed[8] > 4 * K, needed  # rank 16 spans the queries: exact ranking
    assert measure(index, test, truth, K, needed[16]).recall >= 0.94  # 8-bit codes: within rounding


def test_low_rank_8_bit_projection_ranks_as_the_float_one(data, tmp_path):
    """q Bᵀ comes from 8-bit codes of B's rows: the search finds nearly what the same pipeline with
    the float32 factors finds (the best `rerank` by (q Bᵀ) Aᵀ, the k best of them by exact score),
    reads r bytes per padded dimension for it, and survives a round trip."""
    from ann_mlp.index.low_rank_cost import simd_padded
    from ann_mlp.index.low_rank_fit import score_preserving_factors

    keys, queries, truth, calibration = data
    rank, rerank = 16, 4 * K
    coded = build_index("lowrank", keys, queries=calibration, k=K, rank=rank)
    got = coded.search(queries, K, rerank=rerank)
    a, b = score_preserving_factors(keys, calibration, rank)
    candidates = torch.from_numpy(queries @ b.T @ a.T).topk(rerank, dim=1).indices  # (N, rerank), float32 B
    exact = torch.from_numpy(queries) @ torch.from_numpy(keys).T  # (N, n)
    float_ids = candidates.gather(1, exact.gather(1, candidates).topk(K, dim=1).indices)  # (N, K)
    same = [len(np.intersect1d(x, y)) / K for x, y in zip(got.ids, float_ids.numpy())]
    assert np.mean(same) > 0.97
    assert abs(recall_at_k(truth, torch.from_numpy(got.ids), K).mean() - recall_at_k(truth, float_ids, K).mean()) < 0.01
    no_projection = got.bytes_read - len(queries) * rank * simd_padded(DIM)
    assert no_projection == len(queries) * (NUM_KEYS * rank + rerank * DIM * 4)  # codes + re-ranked keys
    files = coded.save(tmp_path, "coded")
    assert "coded.projection.faiss" in files and not any(name.endswith(".npy") for name in files)
    loaded = type(coded).load(tmp_path, "coded", keys, coded.build_params, coded.search_params)
    np.testing.assert_array_equal(loaded.search(queries, K, rerank=rerank).ids, got.ids)
    with pytest.raises(BackendError, match="unknown lowrank build parameters: projection_bits"):
        build_index("lowrank", keys, queries=calibration, k=K, projection_bits=32)


def test_low_rank_rejects_a_rank_outside_the_dimension(data):
    with pytest.raises(BackendError, match="rank must be"):
        build_index("lowrank", data[0], queries=data[3], k=K, rank=DIM + 1)


def test_low_rank_8_bit_rerank_reads_a_quarter_of_the_rerank_bytes(data, tmp_path):
    """rerank_bits=8 ranks the candidates by 8-bit codes of the keys (faiss' QT_8bit decoding) and
    scores only the k kept exactly: the same neighbours, exact scores, a quarter of the re-rank
    bytes plus the k kept keys, and a lossless round trip."""
    import faiss

    keys, queries, truth, calibration = data
    full = build_index("lowrank", keys, queries=calibration, k=K, rank=16)
    coded = build_index("lowrank", keys, queries=calibration, k=K, rank=16, rerank_bits=8)
    rerank = 8 * K
    exact, approx = full.search(queries, K, rerank=rerank), coded.search(queries, K, rerank=rerank)
    np.testing.assert_allclose(approx.scores, np.take_along_axis(truth.numpy(), approx.ids, 1), rtol=1e-4, atol=1e-4)
    assert (
        recall_at_k(truth, torch.from_numpy(approx.ids), K).mean()
        >= recall_at_k(truth, torch.from_numpy(exact.ids), K).mean() - 0.02
    )
    saved = rerank * DIM * 3 - K * DIM * 4  # per query: 3 of 4 bytes of each re-ranked key, less the k kept
    assert exact.bytes_read - approx.bytes_read == len(queries) * saved
    # The ranking is faiss' own decoding of the codes.
    quantizer = faiss.ScalarQuantizer(DIM, faiss.ScalarQuantizer.QT_8bit)
    quantizer.train(keys)
    decoded = torch.from_numpy(quantizer.decode(quantizer.compute_codes(keys)))  # (n, D)
    candidates = torch.arange(NUM_KEYS).expand(len(queries), NUM_KEYS)  # every key a candidate
    _, kept = coded._best_by_key_codes(candidates, torch.from_numpy(queries), K)
    expected = (torch.from_numpy(queries) @ decoded.T).topk(K, dim=1).indices
    assert (kept.sort(1).values == expected.sort(1).values).float().mean() > 0.99  # ties aside
    files = coded.save(tmp_path, "layer_000")
    loaded = type(coded).load(tmp_path, "layer_000", keys, coded.build_params, coded.search_params)
    again = loaded.search(queries, K, rerank=rerank)
    np.testing.assert_array_equal(again.ids, approx.ids)
    assert "layer_000.key_codes.npy" in files
    with pytest.raises(BackendError, match="rerank_bits"):
        build_index("lowrank", keys, queries=calibration, k=K, rerank_bits=4)


def test_low_rank_8_bit_kept_scores_read_no_float32_key(data, tmp_path):
    """kept_bits=8 keeps the 8-bit scores of the k kept: the same neighbours as rerank_bits=8 alone,
    scores within 8-bit rounding of the true ones, k full keys fewer read per query, and the
    setting survives a round trip."""
    keys, queries, truth, calibration = data
    exact_kept = build_index("lowrank", keys, queries=calibration, k=K, rank=16, rerank_bits=8)
    coded_kept = build_index("lowrank", keys, queries=calibration, k=K, rank=16, rerank_bits=8, kept_bits=8)
    assert exact_kept.exact_scores and not coded_kept.exact_scores
    rerank = 8 * K
    reference, approx = exact_kept.search(queries, K, rerank=rerank), coded_kept.search(queries, K, rerank=rerank)
    np.testing.assert_array_equal(np.sort(approx.ids, 1), np.sort(reference.ids, 1))
    true_scores = np.take_along_axis(truth.numpy(), approx.ids, 1)
    step = coded_kept.key_codes.step.numpy()  # (D,): one code's width per dimension
    rounding = np.abs(queries) @ step  # (N,): |q|·step bounds the decoding error of a score
    assert (np.abs(approx.scores - true_scores) <= rounding[:, None] / 2 + 1e-4).all()
    assert np.abs(approx.scores - true_scores).max() > 1e-4  # they are the coded scores, not exact ones
    assert reference.bytes_read - approx.bytes_read == len(queries) * K * DIM * 4
    coded_kept.save(tmp_path, "layer_000")
    loaded = type(coded_kept).load(tmp_path, "layer_000", keys, coded_kept.build_params, coded_kept.search_params)
    np.testing.assert_array_equal(loaded.search(queries, K, rerank=rerank).scores, approx.scores)
    with pytest.raises(BackendError, match="needs rerank_bits=8"):
        build_index("lowrank", keys, queries=calibration, k=K, kept_bits=8)
    with pytest.raises(BackendError, match="kept_bits"):
        build_index("lowrank", keys, queries=calibration, k=K, rerank_bits=8, kept_bits=16)


@pytest.mark.parametrize("code_bits", [8, 4])
def test_low_rank_margin_re_ranks_more_where_the_fit_is_worse(code_bits):
    """With margin_rank, each query's candidates are the keys within margin·σ_q of its k-th best
    approximate score, σ_q its expected score error. Tuned on queries like the calibration ones,
    it keeps its recall on queries that also use other directions (as text of another kind does)
    by re-ranking more for them; a fixed rerank tuned the same way loses recall there. With 4-bit
    codes σ_q counts their rounding too."""
    rng = np.random.default_rng(6)
    dim = 65
    keys = rng.standard_normal((2048, dim)).astype(np.float32)
    calibration, tune, alike = _low_dimensional_queries(rng, (3000, 300, 300), dim, 12)
    other = alike.copy()
    other[:, :-1] += np.abs(alike[:, :-1]).mean() * rng.standard_normal((300, dim - 1)).astype(np.float32)
    truth = {
        name: torch.from_numpy(q) @ torch.from_numpy(keys).T
        for name, q in (("tune", tune), ("alike", alike), ("other", other))
    }
    points = {}
    for margin_rank in (0, 16):
        index = build_index(
            "lowrank", keys, queries=calibration, k=K, rank=8, margin_rank=margin_rank, code_bits=code_bits
        )
        effort = tune_effort(index, tune, truth["tune"], K, 0.95).effort
        points[margin_rank] = {
            name: measure(index, q, truth[name], K, effort) for name, q in (("alike", alike), ("other", other))
        }
    fixed, margin = points[0], points[16]
    assert min(fixed["alike"].recall, margin["alike"].recall) >= 0.94
    assert margin["alike"].bytes_read_fraction <= 1.05 * fixed["alike"].bytes_read_fraction
    assert fixed["other"].recall < 0.85 and margin["other"].recall > 0.92, points
    assert margin["other"].bytes_read_fraction > 1.5 * margin["alike"].bytes_read_fraction


def test_low_rank_margin_basis_and_bytes(data, tmp_path):
    """At full rank the error basis gives each query's exact mean squared score error; at margin 0
    exactly the k best by approximate score are re-ranked, and the bytes count them and the basis:
    t·D bytes from its 8-bit codes (the default), t·D floats with error_basis_bits=32."""
    from ann_mlp.index.low_rank import MAX_MARGIN
    from ann_mlp.index.low_rank_cost import LowRankParams, bytes_per_query
    from ann_mlp.index.low_rank_fit import residual_error_basis, score_preserving_factors

    keys, queries, truth, calibration = data
    a, b = score_preserving_factors(keys, calibration, 4)
    basis = residual_error_basis(keys, a, b, DIM)  # (D, D)
    errors = torch.from_numpy(queries @ (keys - a @ b).T)  # (N, n)
    torch.testing.assert_close(
        torch.from_numpy(queries @ basis.T).square().sum(1), errors.square().mean(1), rtol=1e-3, atol=1e-3
    )
    index = build_index("lowrank", keys, queries=calibration, k=K, rank=4, margin_rank=8)
    assert (index.effort_param, index.effort_range(K)) == ("margin", (0, MAX_MARGIN))
    assert index.params.error_basis_bits == 8 and index.error_basis is None
    result = index.search(queries, K, margin=0)
    per_query = bytes_per_query(LowRankParams(rank=4, margin_rank=8), NUM_KEYS, DIM, K, K)
    assert result.bytes_read == len(queries) * per_query
    assert per_query - bytes_per_query(LowRankParams(rank=4), NUM_KEYS, DIM, K, K) == 8 * DIM
    # The 8-bit basis gives σ_q as the float32 one does, within its rounding.
    float_basis = build_index("lowrank", keys, queries=calibration, k=K, rank=4, margin_rank=8, error_basis_bits=32)
    assert float_basis.error_basis_codes is None and float_basis.params.error_basis_bits == 32
    q = torch.from_numpy(queries)
    first = torch.from_numpy(index._project(queries)[:, :4])
    torch.testing.assert_close(index._score_error(q, first), float_basis._score_error(q, first), rtol=0.02, atol=0)
    float_result = float_basis.search(queries, K, margin=0)
    assert float_result.bytes_read - result.bytes_read == len(queries) * 8 * DIM * 3
    # The float32 basis is saved as an array and loads to the same searches.
    float_basis.save(tmp_path, "layer_000")
    assert (tmp_path / "layer_000.error_basis.npy").exists()
    loaded = type(float_basis).load(tmp_path, "layer_000", keys, float_basis.build_params, {})
    np.testing.assert_array_equal(loaded.search(queries, K, margin=0).ids, float_basis.search(queries, K, margin=0).ids)
    # With margin_counts_rounding=false σ_q is the residual alone, ‖E q‖; by default it counts the rounding too.
    residual_only = (q @ float_basis.error_basis.T).norm(dim=1)
    unrounded = build_index(
        "lowrank",
        keys,
        queries=calibration,
        k=K,
        rank=4,
        margin_rank=8,
        error_basis_bits=32,
        margin_counts_rounding=False,
    )
    torch.testing.assert_close(unrounded._score_error(q, first), residual_only)
    assert (float_basis._score_error(q, first) > residual_only).all()
    for params, message in (
        ({"margin_rank": 8, "refine_rank": 8}, "exclude each other"),
        ({"margin_rank": -1}, "margin_rank must be"),
        ({"code_bits": 2}, "code_bits must be 4 or 8"),
        ({"error_basis_bits": 16}, "error_basis_bits must be 8 or 32"),
        ({"margin_counts_rounding": 1}, "margin_counts_rounding must be true or false"),
        ({"refine": 2}, "unknown lowrank build parameters: refine"),
    ):
        with pytest.raises(BackendError, match=message):
            build_index("lowrank", keys, queries=calibration, k=K, rank=4, **params)
    with pytest.raises(BackendError, match="no search parameter rerank"):
        index.search(queries, K, rerank=64)


def test_low_rank_4_bit_codes_read_half_the_bytes_and_sigma_counts_their_rounding(data):
    """code_bits=4 holds the first pass in faiss' QT_4bit: half a byte per key and rank. At full rank
    the factorisation leaves no residual, so σ_q is the codes' rounding alone, and it predicts the
    mean squared error of the approximate scores over the keys."""
    from ann_mlp.index.low_rank_cost import LowRankParams, bytes_per_query

    keys, queries, _, calibration = data
    index = build_index("lowrank", keys, queries=calibration, k=K, rank=DIM, margin_rank=8, code_bits=4)
    assert index.params.code_bits == 4 and index.codes.code_size == (DIM + 1) // 2
    eight_bit, four_bit = LowRankParams(rank=DIM, code_bits=8), LowRankParams(rank=DIM, code_bits=4)
    assert bytes_per_query(eight_bit, NUM_KEYS, DIM, 0, K) - bytes_per_query(
        four_bit, NUM_KEYS, DIM, 0, K
    ) == NUM_KEYS * (DIM - (DIM + 1) // 2)
    projected = index._project(queries)  # (N, r)
    approximate = torch.from_numpy(projected) @ index.code_table.decode().T  # (N, n)
    observed = (approximate - torch.from_numpy(queries @ keys.T)).square().mean(1)  # (N,)
    predicted = index._score_error(torch.from_numpy(queries), torch.from_numpy(projected)).square()  # (N,)
    ratio = (observed / predicted).mean().item()
    assert 0.8 < ratio < 1.25, ratio
    eight_bit = build_index("lowrank", keys, queries=calibration, k=K, rank=DIM, margin_rank=8)
    assert (
        index._score_error(torch.from_numpy(queries), torch.from_numpy(projected)).mean()
        > 8 * eight_bit._score_error(torch.from_numpy(queries), torch.from_numpy(eight_bit._project(queries))).mean()
    )  # 4 bits: 17x the step


def test_low_rank_4_bit_margin_widens_for_the_rounding_where_the_fit_is_exact():
    """Queries in 12 directions, rank 13: the factorisation scores them exactly, so what errs is the
    4-bit codes' rounding, which only σ_q's rounding term sees; the margin tuned to recall 0.95 then
    re-ranks a few times k, not the whole layer."""
    rng = np.random.default_rng(7)
    dim = 65
    keys = rng.standard_normal((2048, dim)).astype(np.float32)
    calibration, tune, test = _low_dimensional_queries(rng, (3000, 300, 300), dim, 12)
    index = build_index("lowrank", keys, queries=calibration, k=K, rank=13, margin_rank=8, code_bits=4)
    truth = torch.from_numpy(test) @ torch.from_numpy(keys).T
    effort = tune_effort(index, tune, torch.from_numpy(tune) @ torch.from_numpy(keys).T, K, 0.95).effort
    point = measure(index, test, truth, K, effort)
    assert point.recall >= 0.93, point
    assert point.bytes_read_fraction < 0.25, point  # the 4-bit codes alone are 0.05


@pytest.mark.parametrize("code_bits", [8, 4])
def test_low_rank_first_pass_scores_keys_as_faiss_scan_does(data, code_bits):
    """The first pass decodes the codes index's memory in torch: every key's approximate score
    equals faiss' own scan of the same 8- or 4-bit codes, so its candidates are the scan's."""
    keys, queries, _, calibration = data
    index = build_index("lowrank", keys, queries=calibration, k=K, rank=8, code_bits=code_bits)
    first = np.ascontiguousarray(index._project(queries)[:, : index.codes.d])  # (N, r)
    scanned, order = index.codes.search(first, NUM_KEYS)  # (N, n) each, best first
    expected = np.empty_like(scanned)
    np.put_along_axis(expected, order, scanned, axis=1)  # in key order
    decoded = index.code_table.dot_all(torch.from_numpy(first)).numpy()  # (N, n)
    np.testing.assert_allclose(decoded, expected, rtol=1e-4, atol=1e-4)


def test_low_rank_search_in_chunks_equals_one_search(data):
    """More queries than one chunk are searched a chunk at a time, with the same answers and counts."""
    from ann_mlp.index import low_rank

    keys, queries, _, calibration = data
    index = build_index("lowrank", keys, queries=calibration, k=K, rank=8, margin_rank=8)
    whole = index.search(queries, K, margin=150)
    chunk, low_rank.SEARCH_CHUNK = low_rank.SEARCH_CHUNK, 7
    try:
        chunked = index.search(queries, K, margin=150)
    finally:
        low_rank.SEARCH_CHUNK = chunk
    np.testing.assert_array_equal(chunked.ids, whole.ids)
    assert (chunked.bytes_read, chunked.keys_scored) == (whole.bytes_read, whole.keys_scored)


def test_dejavu_predictor_learns_which_neurons_fire():
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((1024, DIM)).astype(np.float32)
    calibration, test = _low_dimensional_queries(rng, (2000, 300), DIM, 7)
    truth = torch.from_numpy(test) @ torch.from_numpy(keys).T
    index = build_index("dejavu", keys, queries=calibration, k=K, steps=300)
    point = measure(index, test, truth, K, 4 * K)
    assert point.recall > 0.8, point  # chance: 4K/1024 = 0.0625


def test_teal_reads_only_the_largest_input_coordinates():
    """Inputs with a few large coordinates (TEAL's observation) are ranked from those alone."""
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((1024, DIM)).astype(np.float32)
    test = (0.01 * rng.standard_normal((300, DIM))).astype(np.float32)
    rows = np.arange(300)[:, None]
    test[rows, rng.choice(DIM - 1, (300, 6), replace=True)] = 5.0
    test[:, -1] = 1.0
    truth = torch.from_numpy(test) @ torch.from_numpy(keys).T
    index = build_index("teal", keys)
    few, all_dims = measure(index, test, truth, K, 7), measure(index, test, truth, K, DIM)
    assert few.recall > 0.9 and all_dims.recall == 1.0
    assert few.bytes_read_fraction < 0.3 < all_dims.bytes_read_fraction


def test_scann_soar_spills_every_key_into_a_second_leaf(data):
    """SOAR stores each key twice: a full search scores every key twice and finds nearly all the
    true top-k (the candidates are still chosen by AH scores before the exact re-order of 4k:
    recall 0.989 in one full-suite run on a clean clone, 1.0 in four runs of this test alone)."""
    _require_backend("scann")
    keys, queries, truth, _ = data
    index = build_index("scann", keys, soar_lambda=1.5)
    full = measure(index, queries, truth, K, index.effort_range(K)[1])
    assert full.recall >= 0.98 and full.scanned_fraction == pytest.approx(2.0)
    assert measure(index, queries, truth, K, 1).scanned_fraction < 0.5


def test_scann_int8_reorder_scores_the_k_found_from_the_models_keys(data, tmp_path):
    """New ScaNN builds re-order from ScaNN's int8 copy (a quarter of the keys' memory) and score
    the k found exactly from the checkpoint's keys, which they lend to the model uncopied; with
    reorder_bits=32 ScaNN re-orders from a float32 copy of its own, and loads as it was built."""
    _require_backend("scann")
    keys, queries, truth, _ = data
    index = build_index("scann", keys)
    assert index.build_params["reorder_bits"] == 8 and index.exact_scores
    result = index.search(queries, K, leaves_to_search=index.effort_range(K)[1])
    found = result.ids >= 0
    exact = np.einsum("nd,nkd->nk", queries, keys[np.maximum(result.ids, 0)])  # (N, K)
    np.testing.assert_allclose(result.scores[found], exact[found], rtol=1e-5, atol=1e-4)
    assert measure(index, queries, truth, K, index.effort_range(K)[1]).recall >= 0.95
    index.save(tmp_path, "int8")
    held = keys.copy()
    loaded = backend_class("scann").load(tmp_path, "int8", held, index.build_params, {})
    assert loaded.key_table().data_ptr() == held.ctypes.data
    np.testing.assert_array_equal(
        loaded.search(queries, K, leaves_to_search=2).ids, index.search(queries, K, leaves_to_search=2).ids
    )

    before = build_index("scann", keys, reorder_bits=32)
    before.save(tmp_path, "float32")
    old = backend_class("scann").load(tmp_path, "float32", keys, before.build_params, {})
    assert old.key_table() is None  # ScaNN's own float32 copy scores the candidates
    np.testing.assert_array_equal(
        old.search(queries, K, leaves_to_search=2).ids, before.search(queries, K, leaves_to_search=2).ids
    )
    with pytest.raises(BackendError, match="reorder_bits"):
        build_index("scann", keys, reorder_bits=16)


def test_low_rank_refinement_reorders_the_first_pass_with_more_columns(tmp_path):
    """refine_rank=16 over rank 8: the best refine_factor·rerank by rank-8 score are re-scored with
    the fit's next 8 columns (8-bit codes), so at the same rerank it finds what rank 8 alone misses,
    for 8 more bytes per refined candidate and 8 more projection rows; it survives a round trip,
    and the build rejects settings it cannot serve."""
    from ann_mlp.index.low_rank_cost import LowRankParams, bytes_per_query, simd_padded
    from ann_mlp.index.low_rank_fit import refined_rerank_needed, rerank_needed, score_preserving_factors

    rng = np.random.default_rng(3)
    dim, num_keys = 129, 2048
    keys = rng.standard_normal((num_keys, dim)).astype(np.float32)
    calibration, test = _low_dimensional_queries(rng, (2000, 300), dim, 14)
    truth = torch.from_numpy(test) @ torch.from_numpy(keys).T
    plain = build_index("lowrank", keys, queries=calibration, k=K, rank=8, rerank_bits=8)
    refined = build_index("lowrank", keys, queries=calibration, k=K, rank=8, refine_rank=16, rerank_bits=8)
    assert refined.build_params["refine_factor"] == 2.5
    rerank = 2 * K
    before, after = plain.search(test, K, rerank=rerank), refined.search(test, K, rerank=rerank)
    recall_before = recall_at_k(truth, torch.from_numpy(before.ids), K).mean().item()
    recall_after = recall_at_k(truth, torch.from_numpy(after.ids), K).mean().item()
    # Rank 16 spans the queries, so the refined order is exact: it keeps rerank candidates yet finds
    # what rank 8 alone finds among all refine_factor·rerank first-pass candidates.
    refined_count = int(np.ceil(2.5 * rerank))
    wide = plain.search(test, K, rerank=refined_count)
    recall_wide = recall_at_k(truth, torch.from_numpy(wide.ids), K).mean().item()
    assert recall_after > recall_before + 0.15 and abs(recall_after - recall_wide) < 0.02, (
        recall_before,
        recall_after,
        recall_wide,
    )
    assert after.bytes_read - before.bytes_read == len(test) * (refined_count * 8 + 8 * simd_padded(dim))
    params = LowRankParams(rank=8, refine_rank=16, rerank_bits=8)
    assert after.bytes_read == len(test) * bytes_per_query(params, num_keys, dim, rerank, K)
    # The build's estimate: refining ranks the first pass's candidates as rank 16 does, exactly here.
    a, b = (torch.from_numpy(m) for m in score_preserving_factors(keys, calibration, 16))
    test_t, keys_t = torch.from_numpy(test), torch.from_numpy(keys)
    assert (
        refined_rerank_needed(keys_t, a, b, test_t, K, 0.95, 8, 16, 2.5)
        < rerank_needed(keys_t, a[:, :8], b[:8], test_t, K, 0.95) / 2
    )
    files = refined.save(tmp_path, "layer_000")
    assert "layer_000.refine_codes.npy" in files and "layer_000.refine_ranges.npy" in files
    loaded = type(refined).load(tmp_path, "layer_000", keys, refined.build_params, refined.search_params)
    np.testing.assert_array_equal(loaded.search(test, K, rerank=rerank).ids, after.ids)
    # "auto" weighs no refinement against 2 and 3 times each first-pass rank and records its choice;
    # none is the default, as it costs search time.
    chosen = build_index("lowrank", keys, queries=calibration, k=K, refine_rank="auto")
    rank, refine_rank = chosen.build_params["rank"], chosen.build_params["refine_rank"]
    assert refine_rank in (0, 2 * rank, 3 * rank) and (refine_rank > 0) == (chosen.refine_codes is not None)
    assert build_index("lowrank", keys, queries=calibration, k=K).build_params["refine_rank"] == 0
    with pytest.raises(BackendError, match="refine_rank must be"):
        build_index("lowrank", keys, queries=calibration, k=K, rank=16, refine_rank=8)
    with pytest.raises(BackendError, match="must exceed a first-pass rank"):
        build_index("lowrank", keys, queries=calibration, k=K, refine_rank=8)  # the smallest rank tried is 8
    with pytest.raises(BackendError, match="refine_factor"):
        build_index("lowrank", keys, queries=calibration, k=K, rank=8, refine_rank=16, refine_factor=0.5)


def test_given_build_parameters_go_over_a_builds_defaults():
    """A refine_rank the user gives replaces the default per-query margin (the two exclude each
    other); every other given parameter simply overrides its default."""
    from ann_mlp.config import DEFAULT_BUILD_PARAMS
    from ann_mlp.index import backend_class

    lowrank, defaults = backend_class("lowrank"), DEFAULT_BUILD_PARAMS["lowrank"]
    assert lowrank.over_defaults(defaults, {}) == defaults
    refined = lowrank.over_defaults(defaults, {"refine_rank": 16})
    assert "margin_rank" not in refined and refined["refine_rank"] == 16
    assert refined["rerank_bits"] == defaults["rerank_bits"]
    assert lowrank.over_defaults(defaults, {"margin_rank": 4})["margin_rank"] == 4
    assert backend_class("ivf").over_defaults({"nlist": 8}, {"nlist": 16, "x": 1}) == {"nlist": 16, "x": 1}


KEY_ROWS_BACKENDS = [
    (name, params)
    for name, params in [(name, {}) for name in BACKENDS] + [("lowrank", {"rerank_bits": 32, "kept_bits": 32})]
    if issubclass(BACKENDS[name], KeyRowsIndex) and BACKENDS[name].reads_keys(params)
]


@pytest.mark.parametrize(("name", "params"), KEY_ROWS_BACKENDS, ids=[f"{n}{p or ''}" for n, p in KEY_ROWS_BACKENDS])
def test_key_rows_held_in_bfloat16_search_as_the_same_values_in_float32(data, name, params):
    """What a bfloat16 model's index does (hold_keys_like): it re-scores from a bfloat16 table, the
    model's own, and finds what it finds from those values in float32, reading 2 bytes per key
    element where it read 4 (its own structures, such as codes, count as before)."""
    _require_backend(name)
    keys, queries, _, calibration = data
    rounded = torch.from_numpy(keys).bfloat16().float().numpy()  # the values a bfloat16 model holds
    wide = build_index(name, rounded, queries=calibration, k=K, **params)
    narrow = build_index(name, rounded, queries=calibration, k=K, **params)
    narrow.hold_keys_like(torch.from_numpy(rounded[:, :-1]).bfloat16())  # the model's keys, without bias
    assert narrow.key_table().dtype == torch.bfloat16 and wide.key_table().dtype == torch.float32
    effort = {wide.effort_param: wide.resolve_effort(K, {})}
    found, expected = narrow.search(queries, K, **effort), wide.search(queries, K, **effort)
    agree = (np.sort(found.ids, axis=1) == np.sort(expected.ids, axis=1)).mean()
    assert agree >= 0.99  # a near-tie may order differently: products summed in another order
    np.testing.assert_allclose(np.sort(found.scores, axis=1), np.sort(expected.scores, axis=1), rtol=1e-4, atol=1e-4)
    assert found.keys_scored == expected.keys_scored and 0 < found.bytes_read < expected.bytes_read
