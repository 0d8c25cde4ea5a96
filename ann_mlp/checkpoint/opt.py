"""OPT: fc1 -> activation_fn -> fc2 inline in the decoder layer's forward.

The approximate MLP takes the place of fc1 and returns d_model; activation_fn
and fc2 become identity, so the layer's own residual and LayerNorm still run.
"""

from __future__ import annotations

from ann_mlp.checkpoint.base import FamilyAdapter, MlpWeights


class OptAdapter(FamilyAdapter):
    model_types = ("opt",)
    kind = "causal_lm"
    activation_setting = "activation_function"
    blocks_path = "model.decoder.layers"

    def num_layers(self) -> int:
        return len(self.model.model.decoder.layers)

    def layer_weights(self, layer: int) -> MlpWeights:
        block = self.model.model.decoder.layers[layer]
        # nn.Linear (out, in): fc1.weight (d_ff, d_model) = keys; fc2.weight
        # (d_model, d_ff) transposed to value rows.
        return MlpWeights(
            keys=block.fc1.weight.detach(),
            key_bias=None if block.fc1.bias is None else block.fc1.bias.detach(),
            values=block.fc2.weight.detach().t(),
            out_bias=None if block.fc2.bias is None else block.fc2.bias.detach(),
            activation=self.model.config.activation_function,
        )

    def _prefix(self, layer: int) -> str:
        return f"model.decoder.layers.{layer}"

    def activation_path(self, layer: int) -> str:
        return f"{self._prefix(layer)}.activation_fn"

    def mlp_input_path(self, layer: int) -> str:
        return f"{self._prefix(layer)}.fc1"

    def mlp_output_path(self, layer: int) -> str:
        return f"{self._prefix(layer)}.fc2"

    def replacement(self, layer: int) -> tuple[str, tuple[str, ...]]:
        prefix = self._prefix(layer)
        return f"{prefix}.fc1", (f"{prefix}.activation_fn", f"{prefix}.fc2")
