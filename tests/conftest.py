from __future__ import annotations

from pathlib import Path

import pytest

from tests.tiny_checkpoints import FAMILIES, write_tiny_checkpoint, write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: write_tiny_checkpoint(family, root / family) for family in FAMILIES}


# Families whose tiny checkpoints are also written in bfloat16 and float16: an encoder, a
# non-gated causal LM and a gated one.
HALF_FAMILIES = ("bert", "gpt2", "llama")


@pytest.fixture(scope="session")
def half_checkpoints(tmp_path_factory) -> dict[tuple[str, str], Path]:
    """{(family, "bfloat16" | "float16"): folder} of tiny checkpoints stored in that dtype."""
    import torch

    root = tmp_path_factory.mktemp("half-checkpoints")
    return {
        (family, dtype): write_tiny_checkpoint(family, root / f"{family}-{dtype}", dtype=getattr(torch, dtype))
        for family in HALF_FAMILIES
        for dtype in ("bfloat16", "float16")
    }


# GGUF block types a tiny LLaMA is also written in (tests.tiny_checkpoints.write_tiny_gguf).
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1")


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory) -> dict[str, str]:
    """{block type: path} of tiny LLaMA GGUF files."""
    root = tmp_path_factory.mktemp("gguf")
    return {qtype: str(write_tiny_gguf(root / f"tiny-{qtype}.gguf", qtype)) for qtype in GGUF_TYPES}


@pytest.fixture(params=FAMILIES)
def tiny_checkpoint(request, tiny_checkpoints) -> Path:
    return tiny_checkpoints[request.param]


@pytest.fixture(scope="session")
def tiny_stores(tiny_checkpoints, tmp_path_factory) -> dict[str, Path]:
    """Index stores of a tiny encoder (BERT) and a tiny gated causal LM (LLaMA)."""
    from ann_mlp.build import build_store
    from ann_mlp.config import BuildConfig, TextConfig

    root = tmp_path_factory.mktemp("stores")
    config = BuildConfig(backend="ivf", k=16, target_recall=0.9, calibration=TextConfig(max_tokens=800))
    return {
        name: build_store(str(tiny_checkpoints[family]), root / name, config, progress=False)
        for name, family in (("tiny-bert", "bert"), ("tiny-llama", "llama"))
    }


@pytest.fixture(scope="session")
def minilm_store(tmp_path_factory) -> Path:
    """A store of the real MiniLM checkpoint (IVF: the tests read its faiss index and memory),
    built through the CLI with a small calibration budget."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("minilm") / "minilm"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ann_mlp",
            "build",
            "minilm",
            "--out",
            str(out),
            "--k",
            "64",
            "--backend",
            "ivf",
            "--calib-tokens",
            "1500",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "built" in proc.stdout and "layer   5" in proc.stdout
    return out
