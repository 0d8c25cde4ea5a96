"""Load a checkpoint (folder of safetensors, GGUF file, or built-in name) with its family adapter."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import math
import mmap
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ann_mlp.activations import activation_module
from ann_mlp.checkpoint.base import FamilyAdapter, MlpWeights, ModelKind
from ann_mlp.checkpoint.bert import BertAdapter
from ann_mlp.checkpoint.builtin import BUILTIN_CHECKPOINTS, resolve_builtin
from ann_mlp.checkpoint.gguf import load_quantized
from ann_mlp.checkpoint.gpt2 import Gpt2Adapter
from ann_mlp.checkpoint.llama import LlamaAdapter
from ann_mlp.checkpoint.opt import OptAdapter
from ann_mlp.checkpoint.t5 import T5Adapter
from ann_mlp.errors import CheckpointError

__all__ = [
    "BUILTIN_CHECKPOINTS",
    "Checkpoint",
    "FamilyAdapter",
    "MlpWeights",
    "ModelKind",
    "install_activations",
    "load_checkpoint",
    "release_mapped_weights",
    "resolve_checkpoint",
    "sha256_file",
]

log = logging.getLogger(__name__)

ADAPTERS: dict[str, type[FamilyAdapter]] = {
    model_type: adapter
    for adapter in (BertAdapter, Gpt2Adapter, OptAdapter, T5Adapter, LlamaAdapter)
    for model_type in adapter.model_types
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# A model folder holds at least one of these when its tokenizer was saved with it.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class CheckpointSource:
    """Where the weights came from, and their checksums (for store verification)."""

    spec: str  # what the user typed: a path or a built-in name
    folder: Path  # what from_pretrained is pointed at
    gguf_file: str | None  # file name inside `folder` for GGUF checkpoints
    weight_files: dict[str, str]  # file name -> sha256

    def to_json(self) -> dict:
        return {
            "spec": self.spec,
            "path": str(self.folder),
            "gguf_file": self.gguf_file,
            "weight_files": self.weight_files,
        }


@dataclass
class Checkpoint:
    model: nn.Module
    tokenizer: object
    adapter: FamilyAdapter
    family: str  # config.model_type
    source: CheckpointSource

    @property
    def kind(self) -> ModelKind:
        return self.adapter.kind

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers()


def resolve_checkpoint(spec: str) -> CheckpointSource:
    """Find the weight files for `spec` and checksum them; refuse pickles. No model is loaded."""
    path = resolve_builtin(spec) if spec in BUILTIN_CHECKPOINTS else Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(
            f"checkpoint {spec!r} not found (a folder, a .gguf file, or one of: {', '.join(BUILTIN_CHECKPOINTS)})"
        )
    if path.is_file():
        if path.suffix == ".gguf":
            check_gguf(path)
            return CheckpointSource(spec, path.parent.resolve(), path.name, {path.name: sha256_file(path)})
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"refusing pickled weights {path.name}: convert them to safetensors")
        raise CheckpointError(f"{path} is not a checkpoint folder or a .gguf file")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
    weights = sorted(p for p in path.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"refusing pickled weights in {path} ({', '.join(pickles)}): only safetensors or GGUF are loaded"
            )
        raise CheckpointError(f"{path} has no .safetensors weights")
    return CheckpointSource(spec, path.resolve(), None, {p.name: sha256_file(p) for p in weights})


def check_gguf(path: Path) -> None:
    """Refuse a GGUF file whose header or tensor table cannot be read (truncated, corrupted), in one line."""
    from gguf import GGUFReader

    try:
        GGUFReader(path)  # memory-maps the file and reads every tensor's extent
    except (ValueError, IndexError, KeyError, OSError, struct.error) as err:
        raise CheckpointError(
            f"{path.name} is not a readable GGUF file (truncated or corrupted?): "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
        ) from None


def _gguf_config(source: CheckpointSource):
    """The model config transformers reads from a GGUF file's metadata (a parse of the whole
    header, the tokenizer's vocabulary included: done once per load)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source.folder, gguf_file=source.gguf_file)


# Weight dtypes served as they are stored; others load as float32.
SERVED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


# CPU features with float16 arithmetic: without them torch emulates float16 matrix products,
# and a float16 MLP ran 9x slower than in float32 (wide-lm decoding, 111 vs 12 ms a step).
FLOAT16_CPU_FLAGS = {"avx512_fp16", "amx_fp16"}


@functools.cache
def cpu_has_float16_arithmetic() -> bool:
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    except OSError:
        return False
    return bool(FLOAT16_CPU_FLAGS.intersection(flags.split()))


def serving_dtype(source: CheckpointSource) -> torch.dtype:
    """The dtype the model is loaded and computed in: the one its weights are stored in (no
    float32 copy of a bfloat16 model), except float16 on a CPU without float16 arithmetic,
    which is computed in float32; GGUF in float32 (its blocks are de-quantized as they are read)."""
    stored = stored_dtype(source)
    if stored == torch.float16 and not cpu_has_float16_arithmetic():
        return torch.float32
    return stored


def stored_dtype(source: CheckpointSource) -> torch.dtype:
    """The dtype most of a safetensors checkpoint's floating-point weights are stored in, read from
    the files' headers (float32 for GGUF and for any dtype other than float32, bfloat16, float16)."""
    if source.gguf_file is not None:
        return torch.float32
    from safetensors import safe_open

    elements_by_dtype: dict[str, int] = {}
    for name in source.weight_files:
        with safe_open(source.folder / name, "pt") as weights:
            for key in weights.keys():
                tensor = weights.get_slice(key)
                dtype = tensor.get_dtype()
                if dtype.startswith(("F", "BF")):
                    elements_by_dtype[dtype] = elements_by_dtype.get(dtype, 0) + math.prod(tensor.get_shape())
    most = max(elements_by_dtype, key=elements_by_dtype.__getitem__, default="F32")
    return SERVED_DTYPES.get(most, torch.float32)


def load_checkpoint(spec: str | CheckpointSource, own_memory: bool = True) -> Checkpoint:
    """Load weights in their serving dtype (`serving_dtype`), in eval mode, and the tokenizer; pick
    the family adapter by model_type.

    own_memory=False leaves weights stored in the dtype they load in memory-mapped from their
    files: a build, which reads one layer at a time, then holds only the pages it reads and can
    give them back (`release_mapped_weights`). A build's store records the files' checksums, so a
    file rewritten meanwhile makes the store refuse to load, not serve other weights.
    """
    import transformers

    source = spec if isinstance(spec, CheckpointSource) else resolve_checkpoint(spec)
    gguf_config = _gguf_config(source) if source.gguf_file else None
    family = (
        gguf_config.model_type
        if gguf_config
        else json.loads((source.folder / "config.json").read_text()).get("model_type", "")
    )
    adapter_cls = ADAPTERS.get(family)
    if adapter_cls is None:
        raise CheckpointError(f"unsupported model family {family!r}; supported: {', '.join(sorted(ADAPTERS))}")
    if source.gguf_file is None and not any((source.folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{source.folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): save it beside the "
            "weights with tokenizer.save_pretrained(folder)"
        )
    auto = {
        "encoder": transformers.AutoModel,
        "causal_lm": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[adapter_cls.kind]
    gguf = {"gguf_file": source.gguf_file} if source.gguf_file else {}
    # use_safetensors=True: never fall back to a pickled file next to the weights.
    weights = gguf or {"use_safetensors": True}
    log.info("loading %s (%s) from %s", source.spec, family, source.folder)
    try:
        # A GGUF model keeps its Q8_0 / Q4_0 / Q4_1 matrices in their blocks (checkpoint.gguf), in
        # memory of its own; None for an architecture that loader does not map.
        model = load_quantized(str(source.folder / source.gguf_file), auto, gguf_config) if gguf_config else None
        if model is None:
            model = auto.from_pretrained(source.folder, dtype=serving_dtype(source), **weights)
            if own_memory:
                _own_memory(model)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source.folder, **gguf)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {source.spec}: {err}".splitlines()[0]) from err
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = adapter_cls(model)
    if adapter.sparse_activation:  # the stock module tree knows only the plain activation
        install_activations(adapter)
    return Checkpoint(model=model, tokenizer=tokenizer, adapter=adapter, family=family, source=source)


def _own_memory(model: torch.nn.Module) -> None:
    """Copy every tensor out of the weight files' memory maps (transformers maps safetensors stored
    in the dtype it loads), releasing each tensor's mapped pages once it is copied.

    A served model must not change, or fault, when its files are rewritten on disk;
    and memory the model owns is what resident-memory figures can count. Releasing as it
    goes keeps the peak at the model's size plus one tensor: the mapping's pages, read by
    the copies, would otherwise stay resident beside them until the mapping is gone.
    """
    mapped = _weight_file_mappings()
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            old = tensor.data
            tensor.data = old.clone()
            _release_mapped_pages(old, mapped)


def release_mapped_weights(tensors: Iterable[object]) -> None:
    """Give back the resident pages of those tensors that are memory-mapped from weight files
    (see `_release_mapped_pages`); a touched page is read back from the file."""
    mapped = _weight_file_mappings()
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):  # not GGUF blocks, which are copied out of their file
            _release_mapped_pages(tensor.data, mapped)


MADV_DONTNEED = 4


def _weight_file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's memory maps of .safetensors files (Linux; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            start, end = (int(address, 16) for address in fields[0].split("-"))
            found.append((start, end))
    return found


def _release_mapped_pages(tensor: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop from memory the whole pages of `tensor`'s storage, if it lies in a weight file's map:
    a read-only file mapping's pages are read back from the file if touched again, so no other
    tensor of the file can see a change. Memory that is not such a mapping is left alone."""
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    if not any(low <= start and end <= high for low, high in mapped):
        return
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


def return_free_heap() -> None:
    """Hand the C allocator's free heap back to the system (glibc's malloc_trim). Blocks of a
    few to some 30 MB, freed between smaller live ones, otherwise stay with the process: after
    a 1.1 B model's layers were built, that was memory the planning pass could not reuse."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None)


def install_activations(adapter: FamilyAdapter) -> None:
    """Make every MLP's activation module compute what the adapter's config records."""
    for layer in range(adapter.num_layers()):
        w = adapter.mlp_weights(layer)
        adapter.model.set_submodule(
            adapter.activation_path(layer), activation_module(w.activation, w.topk, w.threshold)
        )
