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


def write_tiny_gguf(path: Path, qtype_name: str, seed: int = 0) -> Path:
    """A tiny random LLaMA as a GGUF file written with the `gguf` package: every matrix (the tied
    embedding too) in blocks of `qtype_name` (Q8_0, Q4_0, Q4_1), norms in float32, and the byte
    tokenizer's vocabulary as a GPT-2 style tokenizer without merges. Query and key rows are
    permuted as llama.cpp's converter does, which transformers' GGUF loader undoes."""
    import numpy as np
    from gguf import MODEL_ARCH, GGMLQuantizationType, GGUFWriter, TokenType, get_tensor_name_map
    from gguf.quants import quantize

    qtype = GGMLQuantizationType[qtype_name]
    torch.manual_seed(seed)
    config = _config("llama")
    config.tie_word_embeddings = True
    model = transformers.LlamaForCausalLM(config)
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(D_MODEL)
    writer.add_feed_forward_length(D_FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    writer.add_token_scores([0.0] * len(tokens))  # no merges: transformers derives none from single bytes
    writer.add_pad_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(3)
    names = get_tensor_name_map(MODEL_ARCH.LLAMA, LAYERS)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied: the file has the embedding only
            continue
        base, suffix = name.rsplit(".", 1)
        weights = tensor.detach().float().numpy()
        heads = {"q_proj": HEADS, "k_proj": 2}.get(base.rsplit(".", 1)[-1])
        if heads:  # llama.cpp's permute of rotary rows
            weights = weights.reshape(heads, 2, -1, weights.shape[1]).swapaxes(1, 2).reshape(weights.shape)
        if weights.ndim == 2:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", quantize(weights, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
