"""Tiny random checkpoints of every supported family, written with save_pretrained."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

D_MODEL, D_FF, LAYERS, HEADS = 32, 96, 2, 4
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every text tokenizes, vocabulary of 260."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


VOCAB = 4 + 256


def _config(family: str):
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return transformers.BertConfig(
            hidden_size=D_MODEL,
            intermediate_size=D_FF,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=256,
            **common,
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=D_MODEL, n_inner=D_FF, n_layer=LAYERS, n_head=HEADS, n_positions=256, **common
        )
    if family == "opt":
        return transformers.OPTConfig(
            hidden_size=D_MODEL,
            ffn_dim=D_FF,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=256,
            word_embed_proj_dim=D_MODEL,
            **common,
        )
    if family == "t5":
        return transformers.T5Config(
            d_model=D_MODEL,
            d_ff=D_FF,
            num_layers=LAYERS,
            num_heads=HEADS,
            d_kv=8,
            feed_forward_proj="relu",
            decoder_start_token_id=0,
            **common,
        )
    if family in ("llama", "mistral", "qwen2"):
        cls = {
            "llama": transformers.LlamaConfig,
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
        }[family]
        return cls(
            hidden_size=D_MODEL,
            intermediate_size=D_FF,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=2,
            max_position_embeddings=256,
            **common,
        )
    raise ValueError(family)


FAMILIES = ("bert", "gpt2", "opt", "t5", "llama", "mistral", "qwen2")


def write_tiny_checkpoint(family: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    torch.manual_seed(seed)
    config = _config(family)
    auto = {"bert": transformers.AutoModel, "t5": transformers.AutoModelForSeq2SeqLM}.get(
        family, transformers.AutoModelForCausalLM
    )
    model = auto.from_config(config)
    # Random init gives tiny biases; make them substantial so bias folding is tested.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.to(dtype).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder
