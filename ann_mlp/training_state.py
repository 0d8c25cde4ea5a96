"""Resumable training state as safetensors + JSON (weights, AdamW moments, RNG); never pickle.

Shared by `ann-mlp sparsify` and bench/train_relu_lm.py. A save replaces the
previous state atomically: an interrupted save leaves the last good one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def _untied_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied tensors (safetensors refuses shared storage)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.contiguous()
    return state


def save_state(state_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    tmp = state_dir.with_name(state_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_untied_state(model), tmp / "model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    moments = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                moments[f"{names[id(p)]}::{key}"] = value.detach().reshape(-1).clone() if key == "step" else value
    save_file(moments, tmp / "optimizer.safetensors")
    save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
    old = state_dir.with_name(state_dir.name + ".old")
    if state_dir.exists():
        state_dir.rename(old)
    tmp.rename(state_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_state(state_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what save_state wrote into `model` and `optimizer`; return the saved meta."""
    model.load_state_dict(load_file(state_dir / "model.safetensors"), strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    params = dict(model.named_parameters())
    for name, value in load_file(state_dir / "optimizer.safetensors").items():
        pname, key = name.split("::")
        optimizer.state[params[pname]][key] = value.reshape(()) if key == "step" else value
    torch.set_rng_state(load_file(state_dir / "rng.safetensors")["torch_rng"])
    return json.loads((state_dir / "meta.json").read_text())
