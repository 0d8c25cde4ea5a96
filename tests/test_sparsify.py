"""`ann-mlp sparsify`: new activations recorded so every loader reads them, distillation, resume, bad input."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ann_mlp.activations import SparseActivation
from ann_mlp.approx_mlp import ApproxMLP, augmented_keys
from ann_mlp.build import build_store
from ann_mlp.capture import forward, make_batch
from ann_mlp.checkpoint import load_checkpoint
from ann_mlp.config import BuildConfig, SparsifyConfig, TextConfig
from ann_mlp.errors import InputError
from ann_mlp.index import build_index
from ann_mlp.patch import patched
from ann_mlp.sparsify import REPORT_FILE, distillation_loss, sparsify, state_dir_for
from ann_mlp.text import stdlib_passages
from tests.test_cli import TEXT, assert_one_line_error, run
from tests.tiny_checkpoints import D_FF

SMALL = dict(
    text=TextConfig(max_tokens=1 << 30, max_seq_len=32, batch_size=4),
    report_text=TextConfig(max_tokens=400),
    save_every=2,
    warmup=50,
)


@pytest.fixture
def text_file(tmp_path):
    """Enough passages that a quarter of them, held out for the report, is never empty."""
    path = tmp_path / "train.txt"
    path.write_text(TEXT + "\n\n" + "\n\n".join(islice(stdlib_passages("evaluation"), 40)))
    return path


def _run(checkpoint, out, text_file, **config):
    return sparsify(str(checkpoint), out, SparsifyConfig(**{**SMALL, **config}), [text_file], text_file, progress=False)


def test_topk_student_fires_at_most_k_and_is_reported_against_the_original(tiny_checkpoints, tmp_path, text_file):
    out = tmp_path / "bert-topk"
    report = _run(tiny_checkpoints["bert"], out, text_file, method="topk", k=6, steps=3)
    assert report.steps == 3 and report.tokens_seen > 0 and report.k == 6
    assert all(0 < pct <= 6 / D_FF * 100 + 1e-9 for pct in report.nonzero_pct)
    assert all(pct > 20 for pct in report.original_positive_pct)  # random GELU: about half positive
    agreement = report.against_original
    assert -1 <= agreement["embedding_cosine_min"] <= agreement["embedding_cosine_mean"] <= 1
    # in-domain: the training file's held-out quarter; beside it the held-out kind, here the whole file
    assert report.report_text.startswith(str(text_file)) and report.held_out_text.startswith(str(text_file))
    held = report.held_out_against_original
    assert -1 <= held["embedding_cosine_min"] <= held["embedding_cosine_mean"] <= 1
    assert all(0 < pct <= 6 / D_FF * 100 + 1e-9 for pct in report.held_out_nonzero_pct)
    assert json.loads((out / REPORT_FILE).read_text())["nonzero_pct"] == report.nonzero_pct
    logged = [json.loads(line) for line in (out / "sparsify_log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in logged] == [2, 3]  # every save_every=2 steps, and at the end

    reloaded = load_checkpoint(str(out))
    assert reloaded.adapter.topk == 6
    assert isinstance(reloaded.model.get_submodule(reloaded.adapter.activation_path(0)), SparseActivation)
    original = load_checkpoint(str(tiny_checkpoints["bert"]))
    batch = make_batch(original, ["Sparse activations change the model."], 32)
    assert not torch.allclose(forward(original, batch).last_hidden_state, forward(reloaded, batch).last_hidden_state)


def test_relu_gated_model_is_read_by_stock_transformers_and_the_chain_runs(tiny_checkpoints, tmp_path, text_file):
    out = tmp_path / "llama-relu"
    _run(tiny_checkpoints["llama"], out, text_file, method="relu", steps=2)
    config = json.loads((out / "config.json").read_text())
    assert config["hidden_act"] == "relu" and "ann_mlp_topk" not in config
    stock = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(stock.model.layers[0].mlp.act_fn, torch.nn.ReLU)
    store = build_store(
        str(out),
        tmp_path / "store",
        BuildConfig(backend="exact", k=D_FF, target_recall=None, calibration=TextConfig(max_tokens=200)),
        calib_sources=[text_file],
        progress=False,
    )
    proc = run("eval", str(store), "--text", str(text_file), "--max-tokens", "200")
    assert "next_token_agreement" in proc.stdout and " 1.0000" in proc.stdout


def test_fatrelu_threshold_is_installed_and_approx_mlp_matches_it(tiny_checkpoints, tmp_path, text_file):
    out = tmp_path / "opt-fatrelu"
    report = _run(tiny_checkpoints["opt"], out, text_file, method="fatrelu", threshold=0.05, steps=2, l1=0.01)
    assert report.threshold == 0.05
    checkpoint = load_checkpoint(str(out))
    weights = checkpoint.adapter.mlp_weights(1)
    assert weights.threshold == 0.05 and weights.activation == "relu"
    index = build_index("exact", augmented_keys(weights))
    batch = make_batch(checkpoint, ["Thresholds zero the small activations too."], 32)
    exact = forward(checkpoint, batch).logits
    with patched(checkpoint.adapter, {1: ApproxMLP(weights, index, k=weights.d_ff)}):
        approx = forward(checkpoint, batch).logits
    torch.testing.assert_close(approx, exact, atol=1e-5, rtol=1e-5)


def test_distillation_brings_the_student_closer_to_the_original(tiny_checkpoints, tmp_path, text_file):
    def loss_on_training_text(student_folder) -> float:
        teacher, student = load_checkpoint(str(tiny_checkpoints["bert"])), load_checkpoint(str(student_folder))
        batch = make_batch(teacher, TEXT.split("\n\n"), 32)
        with torch.no_grad():
            return float(
                distillation_loss(
                    "encoder",
                    batch,
                    teacher.model(**batch.inputs, output_hidden_states=True),
                    student.model(**batch.inputs, output_hidden_states=True),
                )
            )

    _run(tiny_checkpoints["bert"], tmp_path / "untrained", text_file, method="topk", k=4, steps=1, lr=1e-9)
    _run(tiny_checkpoints["bert"], tmp_path / "trained", text_file, method="topk", k=4, steps=40, lr=1e-3, warmup=1)
    assert loss_on_training_text(tmp_path / "trained") < 0.7 * loss_on_training_text(tmp_path / "untrained")


def test_resumed_run_equals_an_uninterrupted_one(tiny_checkpoints, tmp_path, text_file):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(tiny_checkpoints["bert"], straight, text_file, method="topk", k=8, steps=4)
    _run(tiny_checkpoints["bert"], resumed, text_file, method="topk", k=8, steps=2)
    assert json.loads((state_dir_for(resumed) / "meta.json").read_text())["step"] == 2
    sparsify(
        str(tiny_checkpoints["bert"]),
        resumed,
        SparsifyConfig(**{**SMALL, "method": "topk", "k": 8, "steps": 4}),
        [text_file],
        text_file,
        resume=True,
        progress=False,
    )
    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def test_distillation_loss_is_zero_for_identical_outputs(tiny_checkpoints):
    checkpoint = load_checkpoint(str(tiny_checkpoints["llama"]))
    batch = make_batch(checkpoint, ["identical models agree", "and so do their logits"], 16)
    with torch.no_grad():
        out = checkpoint.model(**batch.inputs, output_hidden_states=True)
    assert float(distillation_loss("causal_lm", batch, out, out)) == pytest.approx(0.0, abs=1e-6)


def test_bad_configs_are_refused():
    with pytest.raises(InputError, match="unknown method"):
        SparsifyConfig(method="gelu")
    with pytest.raises(InputError, match="k applies"):
        SparsifyConfig(method="relu", k=4)
    with pytest.raises(InputError, match="budget"):
        SparsifyConfig(minutes=None, steps=None)


def test_cli_bad_input_one_line_and_nothing_written(tiny_checkpoints, tmp_path, text_file):
    ckpt = str(tiny_checkpoints["bert"])
    out = tmp_path / "out"
    cases = [
        (["--method", "gelu"], "unknown method"),
        (["--k", "0"], "k must be in [1, d_ff"),
        (["--k", str(D_FF + 1)], "k must be in [1, d_ff"),
        (["--resume"], "nothing to resume"),
    ]
    for args, match in cases:
        assert_one_line_error(
            run("sparsify", ckpt, "--out", str(out), "--steps", "1", "--text", str(text_file), *args, check=False),
            match,
        )
        assert not out.exists() and not state_dir_for(out).exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert_one_line_error(
        run("sparsify", ckpt, "--out", str(out), "--steps", "1", "--text", str(empty), check=False), "empty"
    )
    unsupported = tmp_path / "whisper"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "whisper"}))
    (unsupported / "model.safetensors").write_bytes(b"")
    assert_one_line_error(
        run("sparsify", str(unsupported), "--out", str(out), "--steps", "1", check=False),
        "unsupported model family",
    )
    out.mkdir()
    assert_one_line_error(run("sparsify", ckpt, "--out", str(out), "--steps", "1", check=False), "exists")
