from __future__ import annotations

import torch

from ann_mlp.capture import batches
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.config import TextConfig
from ann_mlp.sparsity import measure_sparsity, sparsity_plots, sparsity_table
from ann_mlp.text import file_passages

TEXT = "Alpha beta gamma.\n\nThe second paragraph is a bit longer than the first.\n\nThird, short.\n"


def test_relu_sparsity_matches_the_models_own_activations(tiny_checkpoints, tmp_path):
    """Counted from weights and MLP inputs; checked against hooks on OPT's activation module."""
    path = tmp_path / "t.txt"
    path.write_text(TEXT)
    checkpoint = load_checkpoint(str(tiny_checkpoints["opt"]))
    config = TextConfig(max_tokens=1000, batch_size=2)
    report = measure_sparsity(checkpoint, path, config, progress=False)

    fired = {}
    hooks = []
    for i, layer in enumerate(checkpoint.model.model.decoder.layers):

        def hook(_m, _inp, out, i=i):
            fired.setdefault(i, []).append(out)

        hooks.append(layer.activation_fn.register_forward_hook(hook))
    masks = []
    for batch in batches(checkpoint, file_passages(path), config):
        with torch.no_grad():
            checkpoint.model(**batch.inputs)
        masks.append(batch.mask.reshape(-1))
    for h in hooks:
        h.remove()
    assert report.tokens == sum(int(m.sum()) for m in masks)
    for layer in report.layers:
        outs = torch.cat([o[m] for o, m in zip(fired[layer.layer], masks)])  # (tokens, d_ff)
        expected = float((outs > 0).float().mean(1).mean()) * 100
        assert abs(layer.nonzero_pct - expected) < 1e-3
        assert layer.measure == "nonzero_activations"
        assert layer.dead_neurons == int(((outs > 0).sum(0) == 0).sum())
        freq = layer.firing_frequency_sorted
        assert all(a >= b for a, b in zip(freq, freq[1:]))
        p = layer.per_token_pct_percentiles
        assert p["p10"] <= p["p50"] <= p["p90"] <= p["p99"] <= 100
    assert "% non-zero" in sparsity_table(report)
    assert sparsity_plots(report, tmp_path / "plots")[0].exists()


def test_non_relu_models_are_labelled_as_positive_preactivations(tiny_checkpoints):
    report = measure_sparsity(
        load_checkpoint(str(tiny_checkpoints["llama"])), None, TextConfig(max_tokens=300), progress=False
    )
    assert {entry.measure for entry in report.layers} == {"positive_preactivations"}
    assert "positive pre-activations counted" in sparsity_table(report)
    assert all(0 < entry.nonzero_pct < 100 for entry in report.layers)
