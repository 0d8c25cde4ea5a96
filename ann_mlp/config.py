"""Typed, frozen configuration: the only place where defaults live."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ann_mlp.errors import InputError

STORE_FORMAT_VERSION = 1
DEFAULT_STORE_ROOT = Path("indexes")
DEFAULT_K = 128
DEFAULT_BACKEND = "ivf"
DEFAULT_TARGET_RECALL = 0.95


@dataclass(frozen=True)
class TextConfig:
    """How much real text to run through the model, and how it is cut."""

    max_tokens: int = 16_384  # total tokens captured per run
    max_seq_len: int = 128  # tokens per passage
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_seq_len < 2 or self.batch_size < 1:
            raise InputError("text budget, sequence length and batch size must be positive")


@dataclass(frozen=True)
class BuildConfig:
    """Everything `ann-mlp build` needs besides the checkpoint."""

    backend: str = DEFAULT_BACKEND
    k: int = DEFAULT_K
    target_recall: float | None = DEFAULT_TARGET_RECALL
    # When set, each layer gets the smallest k whose exact top-k keeps this share of
    # the activation mass on calibration tokens (`k` is then the largest allowed).
    mass_target: float | None = None
    build_params: dict = field(default_factory=dict)
    calibration: TextConfig = TextConfig()
    # Share of calibration tokens kept apart to report build-time recall on
    # queries the tuner did not see.
    holdout_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise InputError(f"k must be >= 1, got {self.k}")
        if self.target_recall is not None and not 0.0 < self.target_recall <= 1.0:
            raise InputError(f"target recall must be in (0, 1], got {self.target_recall}")
        if self.mass_target is not None and not 0.0 < self.mass_target <= 1.0:
            raise InputError(f"mass target must be in (0, 1], got {self.mass_target}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise InputError("holdout fraction must be in (0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    """Everything `ann-mlp eval` needs besides the store."""

    k: int | None = None  # None: the k the store was built for
    search_params: dict = field(default_factory=dict)  # effort overrides; absent: the tuned values
    text: TextConfig = TextConfig(max_tokens=8_192)
