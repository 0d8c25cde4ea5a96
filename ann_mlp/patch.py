"""Swap a loaded model's MLPs for ApproxMLP modules, and back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from ann_mlp.approx_mlp import ApproxMLP
from ann_mlp.checkpoint.base import FamilyAdapter

# Stateless, so one instance stands in everywhere: constructing modules on every swap cost
# as much as the swaps themselves, and a model is patched per request.
_IDENTITY = nn.Identity()


class Patch:
    """The original modules replaced in one model; `undo()` restores them."""

    def __init__(self) -> None:
        self.originals: list[tuple[nn.Module, str, nn.Module]] = []  # (parent, attribute, original)

    def swap(self, slot: tuple[nn.Module, str], module: nn.Module) -> None:
        parent, name = slot
        self.originals.append((parent, name, getattr(parent, name)))
        setattr(parent, name, module)

    def undo(self) -> None:
        for parent, name, original in reversed(self.originals):
            setattr(parent, name, original)
        self.originals.clear()


def patch_model(adapter: FamilyAdapter, mlps: dict[int, ApproxMLP]) -> Patch:
    """Put each ApproxMLP in place of its layer's MLP. Layers not in `mlps` stay exact."""
    patch = Patch()
    for layer, mlp in mlps.items():
        target, identities = adapter.replacement(layer)
        patch.swap(adapter.slot(target), mlp)
        for path in identities:
            patch.swap(adapter.slot(path), _IDENTITY)
    return patch


@contextmanager
def patched(adapter: FamilyAdapter, mlps: dict[int, ApproxMLP]) -> Iterator[Patch]:
    patch = patch_model(adapter, mlps)
    try:
        yield patch
    finally:
        patch.undo()
