"""T5: encoder blocks then decoder blocks, each with a `DenseReluDense` MLP.

v1.0 (T5DenseActDense): wi, act, wo, no biases. v1.1 (T5DenseGatedActDense):
act(wi_0 x) * (wi_1 x), retrieved by the wi_0 gate rows. Layers are numbered
encoder first, then decoder.
"""

from __future__ import annotations

from ann_mlp.checkpoint.base import FamilyAdapter, MlpWeights


class T5Adapter(FamilyAdapter):
    model_types = ("t5",)
    kind = "seq2seq"
    activation_setting = "dense_act_fn"

    def set_activation(self, activation: str, topk: int | None = None, threshold: float | None = None) -> None:
        # T5 derives dense_act_fn from feed_forward_proj ("gated-gelu", "relu") when it loads.
        config = self.model.config
        config.feed_forward_proj = f"gated-{activation}" if config.is_gated_act else activation
        super().set_activation(activation, topk, threshold)

    def num_layers(self) -> int:
        return len(self.model.encoder.block) + len(self.model.decoder.block)

    def _path(self, layer: int) -> str:
        num_encoder = len(self.model.encoder.block)
        if layer < num_encoder:
            return f"encoder.block.{layer}.layer.1.DenseReluDense"
        # decoder blocks: self-attention, cross-attention, then the MLP
        return f"decoder.block.{layer - num_encoder}.layer.2.DenseReluDense"

    def layer_weights(self, layer: int) -> MlpWeights:
        mlp = self.model.get_submodule(self._path(layer))
        activation = self.model.config.dense_act_fn
        # nn.Linear (out, in): wi*/wo weights are (d_ff, d_model) / (d_model, d_ff).
        if hasattr(mlp, "wi_0"):
            return MlpWeights(
                keys=mlp.wi_0.weight.detach(),
                key_bias=None,
                values=mlp.wo.weight.detach().t(),
                out_bias=None,
                activation=activation,
                up=mlp.wi_1.weight.detach(),
            )
        return MlpWeights(
            keys=mlp.wi.weight.detach(),
            key_bias=None,
            values=mlp.wo.weight.detach().t(),
            out_bias=None,
            activation=activation,
        )

    def activation_path(self, layer: int) -> str:
        return f"{self._path(layer)}.act"

    def mlp_input_path(self, layer: int) -> str:
        return self._path(layer)

    def mlp_output_path(self, layer: int) -> str:
        return self._path(layer)

    def replacement(self, layer: int) -> tuple[str, tuple[str, ...]]:
        return self._path(layer), ()
