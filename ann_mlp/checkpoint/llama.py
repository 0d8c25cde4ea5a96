"""LLaMA-style gated MLPs (LLaMA, Mistral, Qwen2): down(act(gate x) * up(x))."""

from __future__ import annotations

from torch import nn

from ann_mlp.checkpoint.base import FamilyAdapter, MlpWeights


def _bias(linear: nn.Linear):
    return None if linear.bias is None else linear.bias.detach()


class LlamaAdapter(FamilyAdapter):
    model_types = ("llama", "mistral", "qwen2")
    kind = "causal_lm"
    activation_setting = "hidden_act"
    blocks_path = "model.layers"

    def num_layers(self) -> int:
        return len(self.model.model.layers)

    def layer_weights(self, layer: int) -> MlpWeights:
        mlp = self.model.model.layers[layer].mlp
        # nn.Linear (out, in): gate/up weights are (d_ff, d_model) = rows as is;
        # down.weight is (d_model, d_ff), transposed to value rows.
        return MlpWeights(
            keys=mlp.gate_proj.weight.detach(),
            key_bias=_bias(mlp.gate_proj),
            values=mlp.down_proj.weight.detach().t(),
            out_bias=_bias(mlp.down_proj),
            activation=self.model.config.hidden_act,
            up=mlp.up_proj.weight.detach(),
            up_bias=_bias(mlp.up_proj),
        )

    def activation_path(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.act_fn"

    def mlp_input_path(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp"

    def mlp_output_path(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp"

    def replacement(self, layer: int) -> tuple[str, tuple[str, ...]]:
        return self.mlp_input_path(layer), ()
