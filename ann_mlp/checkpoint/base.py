"""What every family adapter yields, and the interface adapters implement."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar, Literal

import torch
from torch import nn

from ann_mlp.quantized import QuantizedMatrix

ModelKind = Literal["encoder", "causal_lm", "seq2seq"]


@dataclass(frozen=True)
class MlpWeights:
    """One MLP layer as y = values^T act(keys x + key_bias) + out_bias.

    Gated MLPs (SwiGLU, GEGLU) compute act(keys x) * (up x); `keys` then holds
    the gate rows, which are what the index retrieves by.
    All tensors are views of the model's own parameters where the layout allows; a GGUF
    model's quantized matrices are QuantizedMatrix views of its blocks.
    """

    keys: torch.Tensor | QuantizedMatrix  # (d_ff, d_model)
    key_bias: torch.Tensor | None  # (d_ff,)
    values: torch.Tensor | QuantizedMatrix  # (d_ff, d_model)
    out_bias: torch.Tensor | None  # (d_model,)
    activation: str  # a key of transformers.activations.ACT2FN
    up: torch.Tensor | QuantizedMatrix | None = None  # (d_ff, d_model), gated MLPs only
    up_bias: torch.Tensor | None = None  # (d_ff,)
    topk: int | None = None  # Top-k Transformer: only the k largest pre-activations are kept
    threshold: float | None = None  # FATReLU: only pre-activations above it are kept

    def __post_init__(self) -> None:
        d_ff, d_model = self.keys.shape
        assert self.values.shape == (d_ff, d_model), (self.values.shape, self.keys.shape)
        assert self.key_bias is None or self.key_bias.shape == (d_ff,)
        assert self.out_bias is None or self.out_bias.shape == (d_model,)
        assert self.up is None or self.up.shape == (d_ff, d_model)
        assert self.up_bias is None or self.up is not None

    @property
    def d_model(self) -> int:
        return self.keys.shape[1]

    @property
    def d_ff(self) -> int:
        return self.keys.shape[0]

    @property
    def gated(self) -> bool:
        return self.up is not None

    @property
    def narrow_rows(self) -> bool:
        """Whether the model holds its rows in fewer bytes than float32 (bfloat16, float16, GGUF
        blocks): indexes then re-score from those rows rather than from 8-bit codes of their own."""
        return isinstance(self.keys, QuantizedMatrix) or self.keys.dtype in (torch.bfloat16, torch.float16)


class FamilyAdapter(ABC):
    """Knows where one model family keeps its MLPs and how to swap them.

    `replace` returns the module path to set to the approximate MLP, and the
    paths to set to identity, because some families (BERT, OPT) split the MLP
    over modules that also do other work (residual + LayerNorm).
    """

    model_types: ClassVar[tuple[str, ...]]
    kind: ClassVar[ModelKind]
    activation_setting: ClassVar[str]  # the config attribute naming the MLP activation
    # The module list of transformer blocks that run one after another on a hidden state, block i
    # holding layer i's MLP: what a build runs block by block (capture.LayerByLayer). None where
    # blocks need more than the first block's inputs (T5's blocks pass each other a position bias).
    blocks_path: ClassVar[str | None] = None
    # Whether the family can run inputs packed end to end into rows (ann_mlp.packing): its forward
    # takes per-token positions and a per-row (L, L) attention mask; see packed_inputs.
    packs_inputs: ClassVar[bool] = False

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._slots: dict[str, tuple[nn.Module, str]] = {}
        self.topk: int | None = getattr(model.config, "ann_mlp_topk", None)
        self.threshold: float | None = getattr(model.config, "ann_mlp_threshold", None)

    @property
    def sparse_activation(self) -> bool:
        """Whether the config asks for a Top-k or threshold the stock module tree does not know."""
        return bool(self.topk) or self.threshold is not None

    def set_activation(self, activation: str, topk: int | None = None, threshold: float | None = None) -> None:
        """Record a new MLP activation in the config, where both transformers and ann-mlp read it.

        Only the config changes: `load_checkpoint` and `sparsify` install the modules.
        """
        setattr(self.model.config, self.activation_setting, activation)
        for name, value in (("ann_mlp_topk", topk), ("ann_mlp_threshold", threshold)):
            if value is None:
                self.model.config.__dict__.pop(name, None)
            else:
                setattr(self.model.config, name, value)
        self.topk, self.threshold = topk, threshold

    @abstractmethod
    def num_layers(self) -> int: ...

    def mlp_weights(self, layer: int) -> MlpWeights:
        return replace(self.layer_weights(layer), topk=self.topk, threshold=self.threshold)

    @abstractmethod
    def layer_weights(self, layer: int) -> MlpWeights:
        """The layer's weights as the family stores them, transposed to rows."""

    @abstractmethod
    def activation_path(self, layer: int) -> str:
        """The module applying the activation (where a sparse activation is installed)."""

    @abstractmethod
    def mlp_input_path(self, layer: int) -> str:
        """Module whose *input* is the MLP input x (hook point for calibration)."""

    @abstractmethod
    def mlp_output_path(self, layer: int) -> str:
        """Module whose *output* is the MLP output y, before any residual add."""

    def slot(self, path: str) -> tuple[nn.Module, str]:
        """(parent module, attribute name) of the module at a dotted path. Looked up once: patching
        swaps leaves, never the parents, and walking the path cost ~5 µs a swap."""
        if path not in self._slots:
            parent_path, _, name = path.rpartition(".")
            self._slots[path] = (self.model.get_submodule(parent_path) if parent_path else self.model, name)
        return self._slots[path]

    def packed_inputs(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """forward() keyword arguments for packed rows: input_ids and positions (R, L), each input's
        positions counting from 0; attention (R, 1, L, L), an additive mask in the model's dtype
        (0 where a token may attend, the dtype's minimum elsewhere)."""
        raise NotImplementedError(f"{type(self).__name__} cannot run packed inputs")

    @abstractmethod
    def replacement(self, layer: int) -> tuple[str, tuple[str, ...]]:
        """(path that takes the ApproxMLP, paths that become nn.Identity)."""
