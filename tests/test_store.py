from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ann_mlp.approx_model import ApproxModel
from ann_mlp.build import build_indexes, build_store
from ann_mlp.capture import forward, make_batch
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.config import DEFAULT_K, STORE_FORMAT_VERSION, BuildConfig, TextConfig
from ann_mlp.errors import CheckpointError, InputError, StoreError
from ann_mlp.planner import machine
from ann_mlp.store import Store, manifest_checksum
from tests.tiny_checkpoints import D_FF, LAYERS

CONFIG = BuildConfig(backend="ivf", k=16, target_recall=0.9, calibration=TextConfig(max_tokens=600, batch_size=8))


@pytest.fixture(scope="module")
def store(tiny_checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("stores") / "opt"
    return build_store(str(tiny_checkpoints["opt"]), out, CONFIG, progress=False)


def _copy(store, tmp_path):
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(store, target)
    return target


def test_manifest_records_source_layers_and_tuning(store, tiny_checkpoints):
    manifest = Store.open(store).manifest
    assert manifest.format_version == STORE_FORMAT_VERSION and manifest.family == "opt" and manifest.k == 16
    assert manifest.source["weight_files"].keys() == {"model.safetensors"}
    assert manifest.calibration["tokens"] >= 600
    assert len(manifest.layers) == 2
    for entry in manifest.layers:
        assert entry.backend == "ivf" and entry.effort_param == "nprobe"
        lo, hi = entry.effort_range
        assert lo <= entry.search_params["nprobe"] <= hi
        assert entry.build_recall >= 0.8  # held-out tokens; tuned to 0.9 on the others
        assert all(len(sha) == 64 for sha in entry.files.values())


def test_round_trip_runs_the_model(store, tiny_checkpoints):
    model = ApproxModel.open(store)
    batch = make_batch(model.checkpoint, ["Hello there, general store."], 32)
    exact = forward(model.checkpoint, batch).logits
    with model.approximate():
        approx = forward(model.checkpoint, batch).logits
    assert approx.shape == exact.shape and torch.isfinite(approx).all()
    model.configure(k=96, search_params={"nprobe": model.manifest.layers[0].effort_range[1]})
    with model.approximate():
        full = forward(model.checkpoint, batch).logits
    assert float((full - exact).norm() / exact.norm()) < 1e-5
    with pytest.raises(InputError, match="nprobe must be in"):
        model.configure(search_params={"nprobe": 10_000})
    with pytest.raises(InputError, match="no search parameter"):
        model.configure(search_params={"efSearch": 3})


def test_corrupted_missing_and_extra_files_are_named(store, tmp_path):
    copy = _copy(store, tmp_path)
    layer_file = copy / "layer_001.faiss"
    data = bytearray(layer_file.read_bytes())
    data[-1] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="layer_001.faiss is corrupted"):
        Store.open(copy)
    layer_file.unlink()
    with pytest.raises(StoreError, match="missing layer_001.faiss"):
        Store.open(copy)
    copy2 = _copy(store, tmp_path / "b")
    (copy2 / "scann_docids.pkl").write_bytes(b"x")
    with pytest.raises(StoreError, match="unexpected file scann_docids.pkl"):
        Store.open(copy2)
    (copy2 / "scann_docids.pkl").unlink()
    manifest = json.loads((copy2 / "manifest.json").read_text())
    (copy2 / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(StoreError, match="format version 99"):
        Store.open(copy2)
    # An edit that keeps the JSON valid but not the checksum: a search effort changed by hand.
    manifest["layers"][0]["search_params"] = {
        name: value + 1 for name, value in manifest["layers"][0]["search_params"].items()
    }
    (copy2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="manifest.json does not match its checksum"):
        Store.open(copy2)
    (copy2 / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="corrupted"):
        Store.open(copy2)


def _tampered(store, tmp_path, change) -> Path:
    """A copy of the store whose manifest `change(manifest)` edited in place, checksummed again
    (as a hand edit that knew the format would be), so that the check after the checksum is tested."""
    copy = _copy(store, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "checksum": manifest_checksum(manifest)}))
    return copy


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m.update(layers=[]), "lists no layers"),
        (lambda m: m["layers"][1].update(layer=99), "layer entry 1 is numbered 99"),
        (lambda m: m["layers"][0].update(d_ff="many"), r"layers\.0\.d_ff: Input should be a valid integer"),
        (lambda m: m["layers"][0].update(tail_mean_file="/etc/passwd"), "names a file outside the store: /etc/passwd"),
        (lambda m: m["layers"][0].update(tail_mean_file="../x.npy"), r"names a file outside the store: \.\./x\.npy"),
        (lambda m: m["layers"][0]["search_params"].update(nprobe=-7), "nprobe -7 is outside"),
        (lambda m: m.pop("layers"), r"malformed manifest: layers: Field required"),
        (lambda m: m["layers"][0]["build_params"].clear(), "layer 0's build parameters lack"),
        (lambda m: m["layers"][0].update(backend="annoy"), "layer 0's backend 'annoy' is unknown"),
    ],
)
def test_a_malformed_manifest_is_refused_in_one_line(store, tmp_path, change, match):
    with pytest.raises(StoreError, match=match):
        Store.open(_tampered(store, tmp_path, change))


def test_a_manifest_that_does_not_fit_its_checkpoint_is_refused(store, tmp_path):
    def wider(manifest):
        manifest["layers"][0]["d_ff"] += 1

    with pytest.raises(StoreError, match="layer 0 was built for 97x32 keys, the checkpoint's are 96x32"):
        ApproxModel.open(_tampered(store, tmp_path / "a", wider))

    def extra_layer(manifest):
        manifest["layers"].append({**manifest["layers"][-1], "layer": 2})

    with pytest.raises(StoreError, match="has 3 layers, its checkpoint 2"):
        ApproxModel.open(_tampered(store, tmp_path / "b", extra_layer))


def test_store_from_another_checkpoint_is_refused(store, tiny_checkpoints):
    with pytest.raises(CheckpointError, match="built from other weights"):
        ApproxModel.open(store, checkpoint=str(tiny_checkpoints["gpt2"]))


def test_interrupted_build_leaves_nothing(tiny_checkpoints, tmp_path):
    out = tmp_path / "store"
    config = BuildConfig(backend="ivf", k=16, target_recall=None, calibration=TextConfig(max_tokens=200))
    with pytest.raises(InputError, match="empty"):
        build_store(str(tiny_checkpoints["opt"]), out, config, calib_sources=[_empty(tmp_path)], progress=False)
    assert list(tmp_path.iterdir()) == [tmp_path / "empty.txt"]


def test_existing_store_is_kept_unless_forced(store, tiny_checkpoints, tmp_path):
    copy = _copy(store, tmp_path)
    before = (copy / "manifest.json").read_text()
    config = BuildConfig(backend="exact", k=8, target_recall=None, calibration=TextConfig(max_tokens=200))
    with pytest.raises(StoreError, match="already exists"):
        build_store(str(tiny_checkpoints["opt"]), copy, config, progress=False)
    assert (copy / "manifest.json").read_text() == before
    build_store(str(tiny_checkpoints["opt"]), copy, config, overwrite=True, progress=False)
    assert Store.open(copy).manifest.backend == "exact"
    assert sorted(p.name for p in copy.parent.iterdir()) == ["copy"]


def _empty(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n")
    return path


def test_k_is_chosen_per_layer_from_the_activation_mass(tiny_checkpoints, tmp_path):
    """With no k, a sparse (ReLU) layer gets the smallest k keeping mass_target of its activation
    mass, at most half of d_ff; a dense (GELU) one DEFAULT_K (here all of its d_ff); a given k
    applies to every layer."""
    calibration = TextConfig(max_tokens=600, batch_size=8)
    config = BuildConfig(backend="exact", target_recall=None, mass_target=0.9, calibration=calibration)
    store = build_store(str(tiny_checkpoints["opt"]), tmp_path / "mass", config, progress=False)
    manifest = Store.open(store).manifest
    assert BuildConfig.from_json(manifest.build) == config and manifest.extra == {"plan_machine": machine()}
    for entry in manifest.layers:
        assert entry.k is not None and entry.k % 16 == 0 and 16 <= entry.k <= D_FF // 2
    assert manifest.k == max(entry.k for entry in manifest.layers)
    model = ApproxModel.open(store)
    assert [mlp.k for mlp in model.mlps.values()] == [e.k for e in manifest.layers]
    model.configure(k=32)  # an explicit k still applies to every layer
    assert {mlp.k for mlp in model.mlps.values()} == {32}

    dense = build_store(str(tiny_checkpoints["bert"]), tmp_path / "dense", config, progress=False)
    assert [entry.k for entry in Store.open(dense).manifest.layers] == [min(DEFAULT_K, D_FF)] * LAYERS
    fixed = replace(config, k=48)
    assert [
        entry.k
        for entry in build_indexes(load_checkpoint(str(tiny_checkpoints["opt"])), fixed, progress=False)[0].layers
    ] == [48] * LAYERS
    with pytest.raises(InputError, match="mass target"):
        BuildConfig(mass_target=1.5)


def test_k_for_mass_keeps_the_target_share_of_activation():
    from ann_mlp.build import LayerCalibration, k_for_mass
    from ann_mlp.checkpoint.base import MlpWeights

    d = 64
    weights = MlpWeights(keys=torch.eye(d), key_bias=None, values=torch.eye(d), out_bias=None, activation="relu")
    x = -torch.ones(5, d)
    x[:, :20] = 1.0  # 20 neurons fire, equally: a share m needs ceil(20 m) of them
    calibration = LayerCalibration(weights, x)
    assert k_for_mass(calibration, 0.5, 64) == 16  # 10 neurons, rounded up to 16
    assert k_for_mass(calibration, 0.9, 64) == 32  # 18 -> 32
    assert k_for_mass(calibration, 1.0, 24) == 24  # capped at k


def test_tail_correction_is_stored_exact_at_full_k_and_lowers_gelu_error(tiny_checkpoints, tmp_path):
    """Built with --tail-correction, a GELU model's dropped neurons contribute their calibration
    mean: the file is checksummed with the store, k = d_ff stays exact, small k errs less."""
    from ann_mlp.approx_mlp import dense_activations
    from ann_mlp.metrics import relative_errors
    from tests.tiny_checkpoints import D_FF

    errors = {}
    for correct in (False, True):
        config = BuildConfig(
            backend="exact",
            k=8,
            target_recall=None,
            tail_correction=correct,
            plan=False,
            calibration=TextConfig(max_tokens=800),
        )
        store = build_store(str(tiny_checkpoints["bert"]), tmp_path / f"tail-{correct}", config, progress=False)
        manifest = Store.open(store).manifest
        assert all((entry.tail_mean_file is not None) == correct for entry in manifest.layers)
        model = ApproxModel.open(store)
        mlp = model.mlps[0]
        x = torch.randn(64, mlp.weights.d_model, generator=torch.Generator().manual_seed(0))
        exact = dense_activations(mlp.weights, x)[1] @ mlp.value_rows  # (64, d_model)
        if mlp.weights.out_bias is not None:
            exact = exact + mlp.weights.out_bias
        errors[correct] = relative_errors(mlp(x), exact).mean().item()
        mlp.k = D_FF
        torch.testing.assert_close(mlp(x), exact, rtol=1e-4, atol=1e-4)
    assert errors[True] < errors[False], errors
    tail_file = store / manifest.layers[0].tail_mean_file
    tail_file.write_bytes(tail_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StoreError, match="corrupted"):
        Store.open(store)


@pytest.mark.parametrize(
    ("family", "backend"),
    [
        ("gpt2", "lowrank"),
        ("llama", "lowrank"),
        ("bert", "lowrank"),
        ("gpt2", "hnsw"),
        ("bert", "pq"),
        ("gpt2", "ivf"),
        ("llama", "ivf"),
        ("bert", "ivf"),
    ],
)
def test_model_and_index_hold_the_weights_once(tiny_checkpoints, tmp_path, family, backend):
    """Keys live once, in the index's augmented table (faiss' own flat storage for HNSW and
    PQ's refine stage, padded for PQ; IVF's lists, one table in list order), values once in
    ApproxMLP's table; the model's parameters are views of them (GPT-2 stores keys transposed,
    LLaMA and BERT values). Under IVF the model's neurons take the lists' order: the same
    model, summed in another order."""
    # lowrank scores the kept keys from float32 (kept_bits 32), not its default 8-bit codes, so that
    # at k = d_ff and full effort the approximate MLP is the exact one.
    build_params = {"kept_bits": 32} if backend == "lowrank" else {}
    config = BuildConfig(
        backend=backend, k=16, target_recall=0.9, build_params=build_params, calibration=TextConfig(max_tokens=600)
    )
    store = build_store(str(tiny_checkpoints[family]), tmp_path / family, config, progress=False)
    plain = load_checkpoint(str(tiny_checkpoints[family]))
    model = ApproxModel.open(store)
    batch = make_batch(model.checkpoint, ["Memory is shared, not copied."], 16)

    def output(checkpoint):
        result = forward(checkpoint, batch)
        return result.logits if family != "bert" else result.last_hidden_state

    if backend == "ivf":
        torch.testing.assert_close(output(model.checkpoint), output(plain), rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(output(model.checkpoint), output(plain))
    adapter = model.checkpoint.adapter
    for layer, mlp in model.mlps.items():
        weights = adapter.mlp_weights(layer)
        table = mlp.index.key_table()  # (d_ff, >= d_model + 1)
        order = mlp.index.table_order()
        assert (order is None) == (backend != "ivf")
        if order is not None:  # row p of every per-neuron tensor is the checkpoint's neuron order[p]
            original = plain.adapter.mlp_weights(layer)
            assert sorted(order) == list(range(weights.d_ff))
            for name in ("keys", "key_bias", "values", "up", "up_bias"):
                if getattr(original, name) is not None:
                    assert torch.equal(getattr(weights, name), getattr(original, name)[order]), name
        assert weights.keys.data_ptr() == table.data_ptr()
        assert weights.values.data_ptr() == mlp.value_rows.data_ptr()
        if weights.key_bias is not None:
            torch.testing.assert_close(weights.key_bias, table[:, weights.d_model], rtol=0, atol=0)
            assert weights.key_bias.data_ptr() == table[:, weights.d_model].data_ptr()
    index, d_ff = model.mlps[0].index, model.mlps[0].weights.d_ff
    model.configure(k=d_ff, search_params={index.effort_param: index.effort_range(d_ff)[1]})
    with model.approximate():
        full = output(model.checkpoint)
    exact = output(plain)
    assert float((full - exact).norm() / exact.norm()) < 1e-5


@pytest.mark.parametrize(("family", "arrays"), [("bert", "tail_mean"), ("llama", "up_codes")])
def test_ivf_reordered_model_selects_and_sums_the_same_neurons(tiny_checkpoints, tmp_path, family, arrays):
    """An IVF store opened puts the model's neurons in its lists' order; at k < d_ff and a partial
    probe (empty slots included) the approximate MLPs keep the same neurons, with the per-neuron
    arrays (BERT's tail means, LLaMA's up codes) reordered with them, as the same indexes on the
    model in its own order."""
    from ann_mlp.approx_mlp import augmented_keys

    config = BuildConfig(
        backend="ivf",
        k=8,
        target_recall=0.6,
        tail_correction=family == "bert",
        tail_map_rank=0,
        gated_selection=family == "llama",
        plan=False,
        calibration=TextConfig(max_tokens=800),
    )
    path = build_store(str(tiny_checkpoints[family]), tmp_path / family, config, progress=False)
    reordered = ApproxModel.open(path)
    store, plain = Store.open(path), load_checkpoint(str(tiny_checkpoints[family]))
    indexes = {
        e.layer: store.load_index(e.layer, augmented_keys(plain.adapter.mlp_weights(e.layer)))
        for e in store.manifest.layers
    }
    in_order = ApproxModel(
        store.manifest,
        plain,
        indexes,
        layer_arrays={e.layer: store.load_layer_arrays(e.layer) for e in store.manifest.layers},
    )
    assert all(getattr(e, f"{arrays}_file") for e in store.manifest.layers)
    for model in (reordered, in_order):
        model.configure(search_params={"nprobe": 1})  # one list of ~6 keys: slots stay empty
    x = torch.randn(48, plain.adapter.mlp_weights(0).d_model, generator=torch.Generator().manual_seed(1))
    empty_slots = 0
    for layer, mlp in reordered.mlps.items():
        order = torch.from_numpy(mlp.index.table_order())
        with torch.inference_mode():
            y, kept, _ = mlp.forward_with_selection(x)
            y_in_order, kept_in_order, _ = in_order.mlps[layer].forward_with_selection(x)
        found = kept >= 0
        empty_slots += int((~found).sum())
        assert torch.equal(found, kept_in_order >= 0)
        assert torch.equal(order[kept[found]], kept_in_order[found])  # the same checkpoint neurons
        torch.testing.assert_close(y, y_in_order, rtol=1e-5, atol=1e-6)
    assert empty_slots > 0


@pytest.mark.parametrize(("family", "corrected"), [("bert", True), ("opt", False), ("llama", False)])
def test_tail_correction_by_default_only_where_the_tail_is_not_zero(tiny_checkpoints, tmp_path, family, corrected):
    """GELU (BERT) drops non-zero neurons; ReLU (OPT) drops zeros; gated (LLaMA) is served by
    choosing neurons by contribution instead (test_gated_build_chooses_by_estimated_contribution)."""
    config = BuildConfig(backend="exact", k=8, target_recall=None, plan=False, calibration=TextConfig(max_tokens=400))
    manifest = Store.open(
        build_store(str(tiny_checkpoints[family]), tmp_path / family, config, progress=False)
    ).manifest
    assert all((entry.tail_mean_file is not None) == corrected for entry in manifest.layers)


def test_gated_build_chooses_by_estimated_contribution(tiny_checkpoints, tmp_path):
    """A gated model, whose gate score ranks the neurons' contributions poorly: the build tunes more
    candidates than k per layer and stores 8-bit codes of the up rows with its checksums; the loaded
    model chooses the k largest estimated |silu(g)*u| among them, which lowers the MLP error on text
    it was not built on against the top k by gate score. The built selection scales with k unless a
    candidate factor is asked for; with the selection turned off nothing of it is stored."""
    from dataclasses import replace

    from ann_mlp.approx_mlp import exact_output
    from ann_mlp.capture import forward_capturing
    from ann_mlp.metrics import total_relative_error
    from tests.tiny_checkpoints import D_FF, D_MODEL

    config = BuildConfig(
        backend="exact", k=8, target_recall=None, tail_map_rank=0, plan=False, calibration=TextConfig(max_tokens=1500)
    )
    stores = {
        on: build_store(
            str(tiny_checkpoints["llama"]),
            tmp_path / f"selection-{on}",
            replace(config, gated_selection=on),
            progress=False,
        )
        for on in (True, False)
    }
    chosen, by_gate = (Store.open(stores[on]).manifest for on in (True, False))
    assert chosen.build["gated_selection"] and not by_gate.build["gated_selection"]
    assert all(e.candidates is None and e.up_codes_file is None and e.up_ranges_file is None for e in by_gate.layers)
    for entry in chosen.layers:
        assert 8 < entry.candidates <= D_FF, entry
        codes = np.load(stores[True] / entry.up_codes_file)
        assert codes.shape == (D_FF, D_MODEL) and codes.dtype == np.uint8
        assert {entry.up_codes_file, entry.up_ranges_file} <= entry.files.keys()

    models = {on: ApproxModel.open(store) for on, store in stores.items()}
    batch = make_batch(
        models[True].checkpoint,
        ["Evaluation text that neither store was calibrated on, about rivers, trains and the price of tea."] * 2,
        32,
    )
    layers = [entry.layer for entry in chosen.layers]
    _, captured = forward_capturing(models[True].checkpoint, batch, layers)
    for entry in chosen.layers:
        x = captured[entry.layer]  # (n, d_model)
        mlp, plain = models[True].mlps[entry.layer], models[False].mlps[entry.layer]
        assert mlp.candidates == entry.candidates and mlp.up_codes is not None and plain.candidates == 8
        exact = exact_output(mlp.weights, x)
        with torch.inference_mode():
            assert total_relative_error(mlp(x), exact) < total_relative_error(plain(x), exact)
    model = models[True]
    model.configure(k=4)
    assert [mlp.candidates for mlp in model.mlps.values()] == [-(-e.candidates // 2) for e in chosen.layers]
    model.configure(candidate_factor=1)
    assert all(mlp.candidates == mlp.k == 8 for mlp in model.mlps.values())
    model.configure()
    assert [mlp.candidates for mlp in model.mlps.values()] == [e.candidates for e in chosen.layers]


def test_tail_map_is_kept_where_it_lowers_held_out_error_and_applies_only_to_its_selection(tiny_checkpoints, tmp_path):
    """A GELU model at k = 8 of 96: the linear map fit to what the top 8 leave out is kept in the
    layers where it lowered the held-out error, checksummed with the store, lowers the error on real
    text it was not fit on, counts its bytes as read, and is not applied to another selection (more
    candidates, or another k: k = d_ff is exact)."""
    from ann_mlp.approx_mlp import exact_output
    from ann_mlp.capture import forward_capturing
    from ann_mlp.metrics import total_relative_error
    from tests.tiny_checkpoints import D_FF, D_MODEL

    stores = {}
    for rank in (0, 8):
        config = BuildConfig(
            backend="exact",
            k=8,
            target_recall=None,
            tail_correction=False,
            tail_map_rank=rank,
            plan=False,
            calibration=TextConfig(max_tokens=1500),
        )
        stores[rank] = build_store(str(tiny_checkpoints["bert"]), tmp_path / f"map-{rank}", config, progress=False)
    plain, mapped = (Store.open(stores[rank]).manifest for rank in (0, 8))
    assert all(e.tail_map_file is None and e.tail_map_error is None for e in plain.layers)
    assert mapped.build["tail_map_rank"] == 8
    for entry in mapped.layers:
        without, with_map = entry.tail_map_error
        assert (entry.tail_map_file is not None) == (with_map < without)
    kept = [entry.layer for entry in mapped.layers if entry.tail_map_file]
    assert kept, mapped.layers
    assert np.load(stores[8] / mapped.layers[kept[0]].tail_map_file).shape == (8, 2 * D_MODEL + 1)

    models = {rank: ApproxModel.open(store) for rank, store in stores.items()}
    batch = make_batch(
        models[8].checkpoint,
        ["Evaluation text that neither store was calibrated on, about rivers, trains and the price of tea."] * 2,
        32,
    )
    _, captured = forward_capturing(models[8].checkpoint, batch, kept)
    for layer in kept:
        x = captured[layer]  # (n, d_model)
        base, corrected = models[0].mlps[layer], models[8].mlps[layer]
        exact = exact_output(base.weights, x)

        def error(mlp) -> float:
            with torch.inference_mode():
                return total_relative_error(mlp(x), exact)

        assert error(corrected) < error(base)
        with torch.inference_mode():
            read = [mlp.forward_with_selection(x)[2].bytes_read for mlp in (base, corrected)]
        assert read[1] - read[0] == len(x) * 8 * (2 * D_MODEL + 1) * 4
        base.candidates = corrected.candidates = 16  # keeping 8 of 16 by |contribution|: another selection
        with torch.inference_mode():
            assert torch.equal(base(x), corrected(x))
        corrected.k = corrected.candidates = D_FF
        assert error(corrected) < 1e-5
    map_file = stores[8] / mapped.layers[kept[0]].tail_map_file
    map_file.write_bytes(map_file.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(StoreError, match="corrupted"):
        Store.open(stores[8])


def test_settings_given_to_a_block_end_with_it(store):
    """k, effort and candidates passed to approximate()/configured() hold inside the block only,
    also when the block fails or the settings are refused."""
    model = ApproxModel.open(store)

    def settings():
        return [(mlp.k, dict(mlp.search_params), mlp.candidates) for mlp in model.mlps.values()]

    before = settings()
    effort = model.manifest.layers[0].effort_param
    with model.approximate(k=4, search_params={effort: 1}):
        assert all(mlp.k == 4 and mlp.search_params[effort] == 1 for mlp in model.mlps.values())
    assert settings() == before
    with pytest.raises(RuntimeError), model.configured(k=5):
        raise RuntimeError("the work failed")
    assert settings() == before
    with pytest.raises(InputError, match="k must be in"), model.configured(k=10**6):
        pass
    assert settings() == before


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_bfloat16_store_serves_in_bfloat16_without_float32_keys(half_checkpoints, tmp_path, family):
    """A default build of a bfloat16 checkpoint: the served model keeps every weight in bfloat16,
    its parameters take no more bytes than the checkpoint's, the low-rank index re-ranks from the
    model's own bfloat16 key rows (one table, shared; no float32 or 8-bit copy), gated layers
    choose their neurons by the model's own up rows (no up codes), and the approximate model runs
    in bfloat16."""
    folder = half_checkpoints[family, "bfloat16"]
    store = build_store(
        str(folder), tmp_path / family, BuildConfig(calibration=TextConfig(max_tokens=600)), progress=False
    )
    plain = load_checkpoint(str(folder))
    model = ApproxModel.open(store)
    parameters = list(model.checkpoint.model.parameters())
    assert {p.dtype for p in parameters} == {torch.bfloat16}
    assert sum(p.numel() * p.element_size() for p in parameters) == sum(
        p.numel() * p.element_size() for p in plain.model.parameters()
    )
    for layer, mlp in model.mlps.items():
        table = mlp.index.key_table()  # (d_ff, d_model + 1)
        assert table.dtype == torch.bfloat16 and mlp.index.build_params["rerank_bits"] == 32
        assert model.checkpoint.adapter.mlp_weights(layer).keys.data_ptr() == table.data_ptr()
        assert mlp.up_codes is None and not any("up" in part for part in model.manifest.layers[layer].files)
        assert mlp.value_rows.dtype == torch.bfloat16
    batch = make_batch(model.checkpoint, ["Weights stay in the dtype they came in."], 16)
    exact = forward(plain, batch).logits
    assert torch.equal(forward(model.checkpoint, batch).logits, exact)  # the dense path is the model's own
    with model.approximate():
        approx = forward(model.checkpoint, batch).logits
    # Every neuron is kept (the default k of a dense activation exceeds the tiny d_ff), so what
    # differs is bfloat16's rounding: the dense path computes in it, the approximate one in float32.
    assert all(entry.k == D_FF for entry in model.manifest.layers)
    assert approx.dtype == torch.bfloat16
    assert float((approx.float() - exact.float()).norm() / exact.float().norm()) < 2e-2


def test_a_bfloat16_gated_store_chooses_its_neurons_by_the_models_own_up_rows(half_checkpoints, tmp_path):
    """At k below d_ff, a gated bfloat16 layer retrieves more candidates than k and keeps the k
    largest |act(gate) * up| scored from the model's bfloat16 up rows: the store holds no up codes,
    and the served output is the one of choosing among the same candidates by exact contributions."""
    folder = half_checkpoints["llama", "bfloat16"]
    config = BuildConfig(k=16, target_recall=0.9, calibration=TextConfig(max_tokens=600), plan=False)
    model = ApproxModel.open(build_store(str(folder), tmp_path / "store", config, progress=False))
    chosen = [entry for entry in model.manifest.layers if entry.candidates]
    assert chosen and all(entry.candidates > entry.k and entry.up_codes_file is None for entry in chosen)
    x = torch.randn(5, model.mlps[chosen[0].layer].weights.d_model).bfloat16()
    mlp = model.mlps[chosen[0].layer]
    assert mlp.up_codes is None
    with torch.inference_mode():
        y, kept, result = mlp.forward_with_selection(x)
    weights = mlp.weights
    # The candidates by gate score as the index found them, then the k largest exact contributions.
    gate, up = x.float() @ weights.keys.float().T, x.float() @ weights.up.float().T  # (5, d_ff) each
    contribution = torch.nn.functional.silu(gate) * up
    for row in range(5):
        candidates = torch.from_numpy(result.ids[row])
        expected = candidates[contribution[row, candidates].abs().topk(mlp.k).indices]
        assert sorted(kept[row].tolist()) == sorted(expected.tolist())


class _Stopped(Exception):
    """Stands for a build killed part-way (an interrupt, a crash)."""


@pytest.mark.parametrize("weights", ["safetensors", "gguf"])
def test_a_stopped_build_resumes_from_its_finished_layers(tiny_checkpoints, tiny_ggufs, tmp_path, monkeypatch, weights):
    """A build stopped after layer 0 leaves no store but its finished layer, which the next build
    of the same checkpoint and settings takes instead of building it again: the store is the one
    an uninterrupted build writes. A build of other settings starts afresh. Also for a GGUF
    model kept in its blocks."""
    from ann_mlp import build

    spec = str(tiny_checkpoints["llama"]) if weights == "safetensors" else tiny_ggufs["Q4_1"]
    config = BuildConfig(k=16, target_recall=0.9, calibration=TextConfig(max_tokens=600), plan=False)
    whole = Store.open(build_store(spec, tmp_path / "whole", config, progress=False)).manifest
    built_layers = []
    build_layer = build.build_layer

    def stopping_at(stop: int | None):
        def build_one(weights, layer, *args):
            if layer == stop:
                raise _Stopped
            built_layers.append(layer)
            return build_layer(weights, layer, *args)

        return build_one

    out = tmp_path / "store"
    monkeypatch.setattr(build, "build_layer", stopping_at(1))
    with pytest.raises(_Stopped):
        build_store(spec, out, config, progress=False)
    assert not out.exists() and built_layers == [0]
    assert (tmp_path / ".store.partial" / "layer_000.entry.json").is_file()

    monkeypatch.setattr(build, "build_layer", stopping_at(None))
    built_layers.clear()
    resumed = Store.open(build_store(spec, out, config, progress=False)).manifest
    assert built_layers == [1] and not (tmp_path / ".store.partial").exists()
    assert [entry.files for entry in resumed.layers] == [entry.files for entry in whole.layers]
    assert [entry.search_params for entry in resumed.layers] == [entry.search_params for entry in whole.layers]

    monkeypatch.setattr(build, "build_layer", stopping_at(1))
    with pytest.raises(_Stopped):
        build_store(spec, tmp_path / "other", config, progress=False)
    monkeypatch.setattr(build, "build_layer", stopping_at(None))
    built_layers.clear()
    build_store(spec, tmp_path / "other", replace(config, k=8), progress=False)
    assert built_layers == [0, 1]  # another k: nothing of the stopped build is taken


def test_a_second_build_of_a_store_being_built_is_refused(tmp_path):
    """Two builds of one store at once would write over each other's layers: the second is an
    error naming the first's folder, and once the first ends a build may start."""
    from ann_mlp.store import StoreWriter

    out = tmp_path / "store"
    with StoreWriter(out, resume_key="a"):
        with pytest.raises(StoreError, match="another build is writing"):
            StoreWriter(out, resume_key="b")
        assert (tmp_path / ".store.partial" / "resume-key").read_text() == "a"
    with StoreWriter(out, resume_key="b") as writer:
        assert (writer.tmp / "resume-key").read_text() == "b"
    assert not (tmp_path / ".store.partial").exists()
