"""evaluate() end to end for every model kind: at full k and full effort the report says "exact"."""

from __future__ import annotations

import pytest

from ann_mlp.approx_model import ApproxModel
from ann_mlp.build import build_store
from ann_mlp.config import BuildConfig, EvalConfig, TextConfig
from ann_mlp.evaluate import evaluate

TEXT = "Open the file and read it.\n\nClose it when done, even on error.\n\nThen return the bytes read.\n"


@pytest.mark.parametrize("family", ["gpt2", "t5", "bert"])
def test_full_k_report_is_exact_and_small_k_is_not(family, tiny_checkpoints, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    config = BuildConfig(backend="ivf", k=8, target_recall=0.9, calibration=TextConfig(max_tokens=400))
    model = ApproxModel.open(build_store(str(tiny_checkpoints[family]), tmp_path / "s", config, progress=False))
    nlist = model.manifest.layers[0].effort_range[1]
    full = evaluate(model, EvalConfig(k=96, search_params={"nprobe": nlist}), text, progress=False)
    small = evaluate(model, EvalConfig(k=4, search_params={"nprobe": 1}), text, progress=False)
    assert full.k == 96 and len(full.layers) == model.checkpoint.num_layers
    for layer in full.layers:
        assert layer.recall_at_k == 1.0 and layer.mass_recall > 0.9999 and layer.rel_output_error < 1e-5
        assert layer.scanned_fraction == 1.0
    assert all(layer.rel_output_error > 0.01 for layer in small.layers)
    e2e, e2e_small = full.end_to_end, small.end_to_end
    if family == "bert":
        assert e2e["embedding_cosine_min"] > 0.99999 and e2e["neighbour_agreement"] == 1.0
        assert e2e_small["embedding_cosine_min"] < e2e["embedding_cosine_min"]
    else:
        assert e2e["next_token_agreement"] == 1.0 and e2e["kl_mean"] < 1e-6
        assert e2e["perplexity_approx"] == pytest.approx(e2e["perplexity_exact"], rel=1e-5)
        assert e2e_small["kl_mean"] > e2e["kl_mean"]
        assert e2e["positions"] > 0


def test_reference_checkpoint_adds_the_whole_chain(tiny_stores, tiny_checkpoints, tmp_path):
    """A store of a changed model, compared also with the original it came from."""
    from ann_mlp.checkpoint import load_checkpoint
    from ann_mlp.errors import InputError

    model = ApproxModel.open(tiny_stores["tiny-bert"])
    itself = load_checkpoint(str(tiny_checkpoints["bert"]))  # the store's own weights: exact matches exactly
    report = evaluate(model, EvalConfig(text=TextConfig(max_tokens=300)), progress=False, reference=itself)
    exact_vs, approx_vs = report.extra["exact_vs_reference"], report.extra["approx_vs_reference"]
    assert exact_vs["embedding_cosine_min"] == pytest.approx(1.0, abs=1e-5)
    assert approx_vs["embedding_cosine_mean"] == pytest.approx(report.end_to_end["embedding_cosine_mean"], abs=1e-6)
    with pytest.raises(InputError, match="is a causal_lm"):
        evaluate(
            model,
            EvalConfig(text=TextConfig(max_tokens=300)),
            progress=False,
            reference=load_checkpoint(str(tiny_checkpoints["llama"])),
        )


def test_gated_recall_is_labelled_with_the_contribution_recall_beside_it(tiny_stores):
    """A gated store's index ranks by gate score, the model keeps neurons by |act(gate)*up|: the report
    gives recall against both rankings, says which is which, and at full k both are 1."""
    from ann_mlp.report import table

    model = ApproxModel.open(tiny_stores["tiny-llama"])
    small = evaluate(model, EvalConfig(k=4, text=TextConfig(max_tokens=300)), progress=False)
    assert all(layer.gated and 0 <= layer.contribution_recall_at_k <= 1 for layer in small.layers)
    assert any(layer.contribution_recall_at_k != layer.recall_at_k for layer in small.layers)
    printed = table(small)
    assert "contribution_recall_at_k" in printed and "against the gate ranking the index searches" in printed
    nlist = model.manifest.layers[0].effort_range[1]
    full = evaluate(
        model, EvalConfig(k=96, search_params={"nprobe": nlist}, text=TextConfig(max_tokens=300)), progress=False
    )
    assert all(layer.recall_at_k == 1.0 and layer.contribution_recall_at_k == 1.0 for layer in full.layers)
