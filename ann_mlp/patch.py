"""Swap a loaded model's MLPs for ApproxMLP modules, and back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ann_mlp.approx_mlp import ApproxMLP
from ann_mlp.checkpoint.base import FamilyAdapter


def _set(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = getattr(parent, name)
    setattr(parent, name, module)
    return old


class Patch:
    """The original modules replaced in one model; `undo()` restores them."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.originals: list[tuple[str, nn.Module]] = []

    def undo(self) -> None:
        for path, original in reversed(self.originals):
            _set(self.model, path, original)
        self.originals.clear()


def patch_model(adapter: FamilyAdapter, mlps: dict[int, ApproxMLP]) -> Patch:
    """Put each ApproxMLP in place of its layer's MLP. Layers not in `mlps` stay exact."""
    patch = Patch(adapter.model)
    for layer, mlp in mlps.items():
        target, identities = adapter.replacement(layer)
        patch.originals.append((target, _set(adapter.model, target, mlp)))
        for path in identities:
            patch.originals.append((path, _set(adapter.model, path, nn.Identity())))
    return patch


@contextmanager
def patched(adapter: FamilyAdapter, mlps: dict[int, ApproxMLP]) -> Iterator[Patch]:
    patch = patch_model(adapter, mlps)
    try:
        yield patch
    finally:
        patch.undo()
