"""Typed, frozen configuration: the only place where defaults live."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ann_mlp.errors import InputError

# 3: the manifest records every build setting (BuildConfig, complete build parameters per layer)
# and a checksum of itself.
STORE_FORMAT_VERSION = 3
DEFAULT_STORE_ROOT = Path("indexes")
# Keys per token where no activation mass picks k: dense activations (GELU, SiLU), whose every
# neuron carries some of the output.
DEFAULT_K = 128
# Sparse activations (ReLU, Top-k, thresholds): per layer, the smallest k whose exact top-k keeps
# this share of the activation mass, at most half of d_ff. Layers of one model differ widely
# (relu-lm: a quarter of layer 0's neurons fire, 3-5 % of the others'), so no one k fits them.
DEFAULT_MASS_TARGET = 0.98
# Fewest bytes read at recall 0.95 on every checkpoint measured (held-out text: topk-lm 0.10 vs IVF's
# 0.61, relu-lm 0.11 vs 0.60, minilm 0.32 vs 0.88, minilm-sparse 0.30 vs 0.89), keys held once.
DEFAULT_BACKEND = "lowrank"
DEFAULT_TARGET_RECALL = 0.99
# lowrank re-ranks every key within a per-query margin of the k-th approximate score, the margin
# from 16 error directions: how many are re-ranked adapts to each query, so the tuned recall holds
# on text of other kinds, where a fixed re-rank count tuned on calibration falls. It re-ranks, and
# scores the k it keeps, from 8-bit codes of the keys (scores within about 1 %): a quarter of the
# bytes of float32 keys, which a layer firing a quarter of its neurons (relu-lm's layer 0) would
# otherwise read whole. The codes hold a quarter of the keys' memory again.
DEFAULT_BUILD_PARAMS = {"lowrank": {"margin_rank": 16, "rerank_bits": 8, "kept_bits": 8}}
# Over those, for a bfloat16, float16 or GGUF model: re-rank from the model's own rows, which the
# index then shares (MipsIndex.hold_keys_like), so the store holds no copy of the keys beside the
# model; 8-bit codes would add half the gate's bytes (more than Q4 blocks hold). Each re-ranked
# key reads 2 bytes per element (16-bit) or its blocks' 0.56-1.06, not 1.
DEFAULT_BUILD_PARAMS_NARROW_ROWS = {"lowrank": {"rerank_bits": 32, "kept_bits": 32}}


TEXT_SPLITS = ("auto", "paragraphs", "lines")
LONG_PASSAGES = ("split", "cut")


@dataclass(frozen=True)
class TextConfig:
    """How much real text to run through the model, and how it is cut."""

    max_tokens: int = 16_384  # total tokens captured per run
    max_seq_len: int = 128  # the passage limit: tokens per sequence the model runs
    batch_size: int = 16
    # How a text file becomes passages: "paragraphs" (blank-line separated), "lines" (one per
    # line), or "auto": lines when the file has no blank line, else paragraphs. JSON Lines files
    # (.jsonl, .ndjson, or any file when jsonl_field is given) are one passage per record.
    split: str = "auto"
    jsonl_field: str | None = None  # the record field holding the text [text]
    # A passage over the limit (max_seq_len, or the model's positions if fewer) is "split" into
    # windows of the limit, every token measured, or "cut" to its first window.
    long_passages: str = "split"

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_seq_len < 2 or self.batch_size < 1:
            raise InputError("text budget, sequence length and batch size must be positive")
        if self.split not in TEXT_SPLITS:
            raise InputError(f"split must be one of {', '.join(TEXT_SPLITS)}, got {self.split!r}")
        if self.long_passages not in LONG_PASSAGES:
            raise InputError(f"long passages are {' or '.join(LONG_PASSAGES)}, got {self.long_passages!r}")
        if self.jsonl_field is not None and not self.jsonl_field:
            raise InputError("the JSON Lines field name must not be empty")


@dataclass(frozen=True)
class BuildConfig:
    """Everything `ann-mlp build` needs besides the checkpoint."""

    backend: str = DEFAULT_BACKEND
    # Keys per token, every layer. None: chosen per layer (build.layer_k), from the activation
    # mass for sparse activations, DEFAULT_K for dense ones.
    k: int | None = None
    target_recall: float | None = DEFAULT_TARGET_RECALL
    # With k None, sparse layers keep this share of the activation mass on calibration tokens.
    mass_target: float = DEFAULT_MASS_TARGET
    # Backend build parameters, over DEFAULT_BUILD_PARAMS (MipsIndex.over_defaults).
    build_params: dict = field(default_factory=dict)
    calibration: TextConfig = TextConfig()
    # Share of calibration tokens kept apart to report build-time recall on
    # queries the tuner did not see.
    holdout_fraction: float = 0.25
    # A kind of text other than the calibration's (a file, folder or named source: text.SOURCES),
    # on which build-time recall is measured too, so a build shows at once whether its tuning
    # holds beyond its own kind. The default, the licence texts, is in no default mix; a machine
    # without it, or None, skips the check.
    check_text: str | None = "licenses"
    check_tokens: int = 2048
    # Time dense vs approximate per layer and batch size, for the run-time planner (mode "auto").
    plan: bool = True
    # Stand in for the neurons not retrieved with their mean activation on the calibration tokens
    # whose top k leaves them out. None: where it pays (build.tail_correction_pays): plain
    # GELU-like activations leave a tail that top-k drops; ReLU / Top-k tails are zero, and
    # gated models are served better by choosing neurons by contribution (candidate_factor).
    tail_correction: bool | None = None
    # Rank of a linear map of [x; 1] fit by least squares to what the approximate MLP still leaves
    # out (build.fit_tail_map), kept per layer only where it lowers the held-out error.
    # None: build.default_tail_map_rank (16; none for Top-k and thresholded layers); 0: none.
    tail_map_rank: int | None = None
    # Gated layers: retrieve more candidates than k by gate score and keep the k with the largest
    # |act(gate) * up|, estimated from 8-bit codes of the up rows (build.tune_candidates picks how many).
    gated_selection: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k is not None and self.k < 1:
            raise InputError(f"k must be >= 1, got {self.k}")
        if self.target_recall is not None and not 0.0 < self.target_recall <= 1.0:
            raise InputError(f"target recall must be in (0, 1], got {self.target_recall}")
        if not 0.0 < self.mass_target <= 1.0:
            raise InputError(f"mass target must be in (0, 1], got {self.mass_target}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise InputError("holdout fraction must be in (0, 1)")
        if self.tail_map_rank is not None and self.tail_map_rank < 0:
            raise InputError(f"tail map rank must be >= 0, got {self.tail_map_rank}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BuildConfig:
        """The config a store's manifest recorded (the inverse of to_json)."""
        known = {f.name for f in fields(cls)}
        return cls(
            **{name: value for name, value in data.items() if name in known and name != "calibration"},
            calibration=TextConfig(**data["calibration"]),
        )


# Recommended builds of built-in checkpoints (`ann-mlp build NAME --preset`); `ann-mlp serve`
# builds indexes/<name> with them on first run.
PRESET_BUILDS: dict[str, BuildConfig] = {
    # The defaults hold for these: k from the activation mass per layer (relu-lm's layer 0 fires
    # ~25% of its neurons, the others 3-5%), a per-query margin, mixed calibration text.
    "minilm": BuildConfig(),
    "relu-lm": BuildConfig(),
    # wide-lm keeps its Top-512 of 16,384 by construction: k is the model's own. A fixed re-rank count
    # tuned to recall 0.99, not a per-query margin: at one token per call the margin's wider
    # candidate sets cost more than the MLP's remaining work.
    "wide-lm": BuildConfig(k=512, build_params={"margin_rank": 0, "rerank_bits": 32, "kept_bits": 32}),
}
# What the README's main job serves: the checkpoint where the method holds up end to end.
DEFAULT_SERVED = "relu-lm"


@dataclass(frozen=True)
class EvalConfig:
    """Everything `ann-mlp eval` needs besides the store."""

    k: int | None = None  # None: the k the store was built for
    search_params: dict = field(default_factory=dict)  # effort overrides; absent: the tuned values
    # Retrieve this many times k by key score, keep the k with the largest |contribution|
    # (gated: |act(gate) * up|); 1: keep the top k by key score; None: as the store was built.
    candidate_factor: float | None = None
    text: TextConfig = TextConfig(max_tokens=8_192)

    def __post_init__(self) -> None:
        if self.candidate_factor is not None and self.candidate_factor < 1:
            raise InputError(f"candidate factor must be at least 1, got {self.candidate_factor}")


SPARSIFY_METHODS = ("topk", "relu", "fatrelu")


@dataclass(frozen=True)
class SparsifyConfig:
    """Everything `ann-mlp sparsify` needs besides the checkpoint and the output folder."""

    method: str = "topk"
    k: int | None = None  # topk: neurons kept per token [d_ff // 16]
    threshold: float = 0.0  # fatrelu: pre-activations at or below it do not fire
    l1: float = 0.0  # weight of an L1 push on the activations (ProSparse)
    # Budget for the whole run, across resumes; training stops at whichever comes first.
    minutes: float | None = 60.0
    steps: int | None = None
    lr: float = 1e-4
    warmup: int = 50
    text: TextConfig = TextConfig(max_tokens=1 << 62, max_seq_len=128, batch_size=16)
    report_text: TextConfig = TextConfig(max_tokens=8_192)
    save_every: int = 100  # steps between saved training states
    dtype: str = "float32"  # of the written weights
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in SPARSIFY_METHODS:
            raise InputError(f"unknown method {self.method!r}; choose from {', '.join(SPARSIFY_METHODS)}")
        if self.minutes is None and self.steps is None:
            raise InputError("give a budget: minutes or steps")
        if (self.minutes is not None and self.minutes <= 0) or (self.steps is not None and self.steps < 1):
            raise InputError("the budget (minutes, steps) must be positive")
        if self.k is not None and self.method != "topk":
            raise InputError("k applies to --method topk only")
        if self.l1 < 0 or self.lr <= 0:
            raise InputError("l1 must be >= 0 and lr > 0")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise InputError(f"dtype must be float32, float16 or bfloat16, got {self.dtype!r}")
