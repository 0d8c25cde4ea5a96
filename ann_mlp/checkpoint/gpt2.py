"""GPT-2: `transformer.h[i].mlp` with Conv1D layers, whose weights are (in, out)."""

from __future__ import annotations

from ann_mlp.checkpoint.base import FamilyAdapter, MlpWeights


class Gpt2Adapter(FamilyAdapter):
    model_types = ("gpt2",)
    kind = "causal_lm"
    activation_setting = "activation_function"
    blocks_path = "transformer.h"

    def num_layers(self) -> int:
        return len(self.model.transformer.h)

    def layer_weights(self, layer: int) -> MlpWeights:
        mlp = self.model.transformer.h[layer].mlp
        # Conv1D stores (in, out): c_fc.weight is (d_model, d_ff) -> transpose to
        # key rows; c_proj.weight is (d_ff, d_model) = value rows as is.
        return MlpWeights(
            keys=mlp.c_fc.weight.detach().t(),
            key_bias=mlp.c_fc.bias.detach(),
            values=mlp.c_proj.weight.detach(),
            out_bias=mlp.c_proj.bias.detach(),
            activation=self.model.config.activation_function,
        )

    def activation_path(self, layer: int) -> str:
        return f"transformer.h.{layer}.mlp.act"

    def mlp_input_path(self, layer: int) -> str:
        return f"transformer.h.{layer}.mlp"

    def mlp_output_path(self, layer: int) -> str:
        return f"transformer.h.{layer}.mlp"

    def replacement(self, layer: int) -> tuple[str, tuple[str, ...]]:
        return self.mlp_input_path(layer), ()
