"""A GGUF checkpoint with its quantized matrices kept in their blocks.

transformers de-quantizes every GGUF tensor to float32 when it loads one: a Q4_1 model then
takes 6-7 times its file's size. Here the model is laid out on the meta device (no memory),
and each tensor of the file is put in place: a Q8_0 / Q4_0 / Q4_1 matrix of a linear layer or of
the embedding stays in its blocks (QuantizedLinear, QuantizedEmbedding); every other tensor
(norms, and matrices of other block types) is de-quantized to float32 as transformers would.
Names and LLaMA's rotary row order are transformers' own GGUF mapping.
"""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import torch
from torch import nn

from ann_mlp.quantized import FORMATS, QuantizedEmbedding, QuantizedLinear, QuantizedMatrix, owned_blocks

log = logging.getLogger(__name__)

# GGUF architectures whose tensors transformers maps by name, reordering at most the rows of
# LLaMA's query and key projections (a permutation of whole rows, which blocks allow).
ROW_ORDER_ARCHITECTURES = ("llama", "mistral", "qwen2")


def load_quantized(path: str, auto: type, config) -> nn.Module | None:
    """The model in `path` with its supported matrices kept quantized; None when the file's
    architecture is not one whose tensors map onto the model row for row (then transformers'
    own de-quantizing loader applies)."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    reader = GGUFReader(path)
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    if architecture not in ROW_ORDER_ARCHITECTURES:
        return None
    # The processor reads head counts from the config (transformers' own GGUF reading of it).
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    with torch.device("meta"):
        model = auto.from_config(config, dtype=torch.float32)
    names = gguf_to_model_names(model, processor)
    kept, widened = Counter(), Counter()
    for tensor in reader.tensors:
        name = names.get(tensor.name)
        if name is None:
            continue
        module_path, _, attribute = name.rpartition(".")
        module = model.get_submodule(module_path)
        if tensor.tensor_type in FORMATS and attribute == "weight" and isinstance(module, (nn.Linear, nn.Embedding)):
            model.set_submodule(module_path, _quantized_module(module, tensor, processor))
            kept[tensor.tensor_type.name] += 1
            continue
        weights = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
        setattr(module, attribute, nn.Parameter(torch.from_numpy(np.array(weights, dtype=np.float32)), False))
        widened[tensor.tensor_type.name] += 1
    _tie_output_to_embedding(model, config)
    _materialise_buffers(model)
    meta = [name for name, tensor in (*model.named_parameters(), *model.named_buffers()) if tensor.is_meta]
    if meta:
        raise ValueError(f"{path} holds no tensor for {', '.join(meta[:3])}")
    log.info("kept quantized: %s; loaded as float32: %s", dict(kept), dict(widened))
    return model


def gguf_to_model_names(model: nn.Module, processor) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, as transformers' get_gguf_hf_weights_map
    maps them, from one build of gguf's name table. transformers builds that table again for
    every submodule it recurses into (for models whose GGUF tensors name a submodule's
    parameters); a 30-layer LLaMA spent seconds of its load there."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map
    from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

    config = model.config
    arch = next((arch for arch, name in MODEL_ARCH_NAMES.items() if name == config.model_type), None)
    if arch is None:
        return get_gguf_hf_weights_map(model, processor)  # its own lookup, and its own error
    table = get_tensor_name_map(arch, config.num_hidden_layers)
    names = {}
    for hf_name in model.state_dict():
        name = processor.preprocess_name(hf_name)
        module, suffix = name, ""
        if name.endswith((".weight", ".bias")):
            module, _, kind = name.rpartition(".")
            suffix = f".{kind}"
        gguf_name = table.get_name(module)
        if gguf_name is not None:
            names[gguf_name + suffix] = hf_name
    return names


def _quantized_module(module: nn.Module, tensor, processor) -> nn.Module:
    """The module `module` stands for, with the GGUF tensor's blocks as its weight."""
    blocks = owned_blocks(tensor.data)  # (rows, row bytes)
    rows = blocks.shape[0]
    # The processor reorders rows (LLaMA's query and key): ask it where each row goes.
    order = processor.process(weights=np.arange(rows, dtype=np.float32)[:, None], name=tensor.name).weights
    order = torch.from_numpy(np.asarray(order[:, 0], dtype=np.int64))
    if not torch.equal(order, torch.arange(rows)):
        blocks = blocks[order].contiguous()
    matrix = QuantizedMatrix(blocks, tensor.tensor_type, cols=int(tensor.shape[0]))
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(matrix)
    quantized = QuantizedLinear(matrix)
    quantized.bias = module.bias  # None, or a placeholder its own tensor in the file fills
    return quantized


def _tie_output_to_embedding(model: nn.Module, config) -> None:
    """A tied output layer (no output.weight in the file) reads the embedding's blocks."""
    output, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(output, nn.Linear) or not output.weight.is_meta or not config.tie_word_embeddings:
        return  # no output layer, or its own tensor was in the file
    if isinstance(embedding, QuantizedEmbedding):
        model.set_output_embeddings(QuantizedLinear(embedding.weight))
    else:
        output.weight = embedding.weight


def _materialise_buffers(model: nn.Module) -> None:
    """Buffers computed at construction (rotary frequencies) are built again off the meta device."""
    for path, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)) and not list(module.parameters(False)):
            model.set_submodule(path, type(module)(config=model.config))
