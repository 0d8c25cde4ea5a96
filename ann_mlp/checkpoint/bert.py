"""BERT-style encoders (BERT, RoBERTa, MiniLM): the MLP is split over two modules.

`intermediate` = dense (d_model -> d_ff) + activation; `output` = dense
(d_ff -> d_model) + dropout + LayerNorm(residual). The approximate MLP takes
the place of `intermediate` and returns d_model; `output.dense` becomes
identity so the residual and LayerNorm still run.
"""

from __future__ import annotations

import torch

from ann_mlp.checkpoint.base import FamilyAdapter, MlpWeights


class BertAdapter(FamilyAdapter):
    model_types = ("bert", "roberta")
    kind = "encoder"
    activation_setting = "hidden_act"
    blocks_path = "encoder.layer"
    packs_inputs = True

    def num_layers(self) -> int:
        return len(self.model.encoder.layer)

    def layer_weights(self, layer: int) -> MlpWeights:
        block = self.model.encoder.layer[layer]
        fc_in, fc_out = block.intermediate.dense, block.output.dense
        # nn.Linear stores (out, in): fc_in.weight is (d_ff, d_model) = keys as is;
        # fc_out.weight is (d_model, d_ff), transposed to value rows.
        return MlpWeights(
            keys=fc_in.weight.detach(),
            key_bias=fc_in.bias.detach(),
            values=fc_out.weight.detach().t(),
            out_bias=fc_out.bias.detach(),
            activation=self.model.config.hidden_act,
        )

    def packed_inputs(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attention: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        # RoBERTa counts positions from padding_idx + 1 (its padding's position is padding_idx).
        padding_idx = getattr(self.model.embeddings, "padding_idx", None)
        first = 0 if padding_idx is None else padding_idx + 1
        return {"input_ids": input_ids, "position_ids": positions + first, "attention_mask": attention}

    def activation_path(self, layer: int) -> str:
        return f"encoder.layer.{layer}.intermediate.intermediate_act_fn"

    def mlp_input_path(self, layer: int) -> str:
        return f"encoder.layer.{layer}.intermediate"

    def mlp_output_path(self, layer: int) -> str:
        return f"encoder.layer.{layer}.output.dense"

    def replacement(self, layer: int) -> tuple[str, tuple[str, ...]]:
        return self.mlp_input_path(layer), (self.mlp_output_path(layer),)
