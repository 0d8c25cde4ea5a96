"""The ReLU LM training script: runs, resumes, finishes into a folder ann-mlp loads, refuses to overwrite."""

from __future__ import annotations

import json

import pytest
import torch

from ann_mlp.checkpoint import load_checkpoint
from bench import train_relu_lm

WORDS = "the kernel schedules tasks while memory pages move between zones and drivers probe devices".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rst")
    for i in range(60):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(120)]
        (folder / f"doc{i:02d}.rst.txt").write_text(" ".join(words) + ".\n")
    return folder


@pytest.fixture(autouse=True)
def keep_thread_count():
    threads = torch.get_num_threads()  # the script sets its own
    yield
    torch.set_num_threads(threads)


def test_train_resume_finish_and_load(corpus, tmp_path):
    common = [
        "--name",
        "tiny",
        "--sources",
        str(corpus),
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(tmp_path / "model"),
        "--layers",
        "1",
        "--d-model",
        "32",
        "--d-ff",
        "64",
        "--heads",
        "2",
        "--vocab",
        "300",
        "--seq-len",
        "16",
        "--batch",
        "2",
        "--eval-every",
        "2",
        "--eval-windows",
        "4",
        "--steps",
        "6",
        "--threads",
        "1",
    ]
    assert train_relu_lm.main(common + ["--steps", "4", "--minutes", "5"]) == 0
    state = json.loads((tmp_path / "cache" / "train" / "tiny" / "meta.json").read_text())
    assert state["step"] == 4
    # resumes up to --steps; a different width on the command line is overridden by the saved run's
    assert train_relu_lm.main([*common, "--minutes", "5", "--d-ff", "128"]) == 0
    log = [json.loads(line) for line in (tmp_path / "cache" / "train" / "tiny.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4, 6]
    assert all(len(r["nonzero_pct"]) == 1 and 0 <= r["nonzero_pct"][0] <= 100 for r in log)
    assert train_relu_lm.main(common + ["--finish"]) == 0
    model = tmp_path / "model"
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "train_log.jsonl",
        "training.json",
        "sparsity_curve.png",
    } <= {p.name for p in model.iterdir()}
    checkpoint = load_checkpoint(str(model))
    assert checkpoint.family == "opt" and checkpoint.adapter.mlp_weights(0).d_ff == 64
    assert train_relu_lm.main(common + ["--finish"]) == 1  # a finished model is not overwritten
