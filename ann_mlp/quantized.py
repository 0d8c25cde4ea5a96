"""Weight matrices kept in GGUF's quantized blocks, read a row or a column at a time.

A GGUF file stores a (rows, cols) weight as `rows` runs of blocks along cols: Q8_0 blocks of 32
int8 codes and one float16 scale (34 bytes), Q4_0 of 32 4-bit codes and a scale (18 bytes), Q4_1
of 32 4-bit codes, a scale and a minimum (20 bytes). An element is scale · code (Q4_0: scale ·
(code − 8)), plus the minimum for Q4_1, as ggml computes it.

Kept in that form a model holds 1.06 (Q8_0) or 0.56-0.63 (Q4) bytes per weight instead of four,
and every product de-quantizes what it reads into float32 first:
- a dense product (`QuantizedMatrix.times_rows`) a chunk of rows at a time, so at most one chunk is
  ever de-quantized;
- the approximate MLP only the rows it retrieves (`rows`): key and up rows are stored rows, value
  rows are stored columns of the down matrix, read as one code and its block's scale per row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

BLOCK = 32  # elements per block in every format here


@dataclass(frozen=True)
class BlockFormat:
    """Where a block keeps its parts: a float16 scale at byte 0, a float16 minimum at `min_at`
    (Q4_1), codes from `codes_at`: `bits` 8 (int8, one per element) or 4 (element e of a block in
    byte e mod 16, the low nibble for e < 16), minus `code_offset`."""

    block_bytes: int
    codes_at: int
    bits: int
    code_offset: int = 0
    min_at: int | None = None

    @property
    def bytes_per_element(self) -> float:
        return self.block_bytes / BLOCK


FORMATS = {
    GGMLQuantizationType.Q8_0: BlockFormat(block_bytes=34, codes_at=2, bits=8),
    GGMLQuantizationType.Q4_0: BlockFormat(block_bytes=18, codes_at=2, bits=4, code_offset=8),
    GGMLQuantizationType.Q4_1: BlockFormat(block_bytes=20, codes_at=4, bits=4, min_at=2),
}

# Elements de-quantized at once by a dense product or a gather: bounds the float32 temporaries.
MAX_DEQUANTIZED = 1 << 21


class QuantizedMatrix:
    """A (rows, cols) matrix held as GGUF blocks, or the transpose of one (`t()`).

    Behaves like the weight tensors MlpWeights carries where the approximate MLP reads them:
    `shape`, `t()`, `float()` (every element in float32), `rows(ids)`; `element_size()` is the
    bytes one element costs, a fraction.
    """

    def __init__(self, blocks: torch.Tensor, qtype: GGMLQuantizationType, cols: int, transposed: bool = False):
        if qtype not in FORMATS:
            raise ValueError(f"{qtype.name} blocks are not kept quantized (supported: {', '.join(supported_types())})")
        self.format = FORMATS[qtype]
        self.qtype = qtype
        self.blocks = blocks  # (stored rows, blocks per row · block bytes) uint8
        self.stored_shape = (blocks.shape[0], cols)
        self.transposed = transposed
        per_row = cols // BLOCK
        grid = blocks.view(blocks.shape[0], per_row, self.format.block_bytes)  # (rows, blocks, bytes)
        fmt = self.format
        # Views of the blocks, no copies: every block and offset is an even number of bytes.
        self.scales = grid[..., 0:2].view(torch.float16).squeeze(-1)  # (rows, blocks)
        self.mins = (
            None if fmt.min_at is None else grid[..., fmt.min_at : fmt.min_at + 2].view(torch.float16).squeeze(-1)
        )
        code_bytes = BLOCK * fmt.bits // 8
        self.codes = grid[..., fmt.codes_at : fmt.codes_at + code_bytes]  # (rows, blocks, 32 or 16), a view

    # -- the tensor-like surface MlpWeights consumers use --------------------------------
    @property
    def shape(self) -> torch.Size:
        rows, cols = self.stored_shape
        return torch.Size((cols, rows) if self.transposed else (rows, cols))

    def t(self) -> QuantizedMatrix:
        view = object.__new__(QuantizedMatrix)
        view.__dict__.update(self.__dict__)
        view.transposed = not self.transposed
        return view

    @property
    def T(self) -> QuantizedMatrix:  # noqa: N802 - torch's spelling
        return self.t()

    def detach(self) -> QuantizedMatrix:
        return self

    def element_size(self) -> float:
        return self.format.bytes_per_element

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def float(self) -> torch.Tensor:
        """Every element in float32, in this view's orientation: (shape) float32."""
        stored = self._dequantize(slice(None), torch.empty(self.stored_shape))
        return stored.T.contiguous() if self.transposed else stored

    # -- reads ----------------------------------------------------------------------------
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """This view's rows `ids` (m,) in float32: (m, shape[1]). Of a transposed matrix they are
        stored columns: one code and its block's scale (and minimum) from each stored row."""
        return self.stored_columns(ids).T if self.transposed else self.stored_rows(ids)

    def stored_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Stored rows ids (m,) -> (m, cols) float32."""
        return self._dequantize(ids, torch.empty(len(ids), self.stored_shape[1]))

    def _dequantize(self, rows: torch.Tensor | slice, out: torch.Tensor) -> torch.Tensor:
        """Stored rows `rows` (ids (m,), or a slice of m rows: read in place) into out (m, cols)
        float32, equal to gguf's de-quantizer bit for bit.

        Every step writes the float32 rows where they stay, with no temporaries their size: at
        one token a dense product's time is mostly this, not the product after it."""
        fmt = self.format
        codes = self.codes[rows]  # (m, blocks, 32 or 16) uint8
        grid = out.view(codes.shape[0], codes.shape[1], BLOCK)  # (m, blocks, 32)
        if fmt.bits == 8:
            grid.copy_(codes.view(torch.int8))
        else:
            # Four codes per int32: the nibble masks run on a quarter as many elements. A block's
            # low nibbles are its elements 0-15, the high ones 16-31: (2, 16) per block.
            words = codes.contiguous().view(torch.int32)  # (m, blocks, 4)
            nibbles = torch.stack([words & 0x0F0F0F0F, (words >> 4) & 0x0F0F0F0F], dim=-2)  # (m, blocks, 2, 4)
            grid.view(*codes.shape[:2], 2, BLOCK // 2).copy_(nibbles.view(torch.uint8))
        if fmt.code_offset:
            grid.sub_(fmt.code_offset)
        grid.mul_(self.scales[rows].float().unsqueeze(-1))
        if self.mins is not None:
            grid.add_(self.mins[rows].float().unsqueeze(-1))
        return out

    def stored_columns(self, ids: torch.Tensor) -> torch.Tensor:
        """Stored columns ids (m,) -> (rows, m) float32."""
        fmt = self.format
        block, within = ids // BLOCK, ids % BLOCK  # (m,), (m,)
        if fmt.bits == 8:
            levels = self.codes[:, block, within].contiguous().view(torch.int8).float()  # (rows, m)
        else:
            packed = self.codes[:, block, within % 16]  # (rows, m)
            levels = ((packed >> (4 * (within // 16)).to(torch.uint8)) & 15).float()
        if fmt.code_offset:
            levels -= fmt.code_offset
        values = levels * self.scales[:, block].float()
        if self.mins is not None:
            values += self.mins[:, block].float()
        return values

    def stored_row_chunks(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """The stored rows in order, de-quantized a chunk at a time into one buffer: (rows,
        (chunk, cols) float32), each chunk valid until the next is read."""
        rows, cols = self.stored_shape
        chunk = min(rows, max(1, MAX_DEQUANTIZED // cols))
        buffer = torch.empty(chunk, cols)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            yield slice(start, stop), self._dequantize(slice(start, stop), buffer[: stop - start])

    def times_rows(self, x: torch.Tensor) -> torch.Tensor:
        """x @ storedᵀ: x (N, cols) -> (N, rows) float32."""
        x = x.float()
        out = torch.empty(x.shape[0], self.stored_shape[0])
        for rows, dequantized in self.stored_row_chunks():
            out[:, rows] = x @ dequantized.T
        return out

    def times_columns(self, x: torch.Tensor) -> torch.Tensor:
        """x @ stored: x (N, rows) -> (N, cols) float32."""
        x = x.float()
        out = torch.zeros(x.shape[0], self.stored_shape[1])
        for rows, dequantized in self.stored_row_chunks():
            out.addmm_(x[:, rows], dequantized)
        return out

    def right_multiply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ this view: x (N, shape[0]) -> (N, shape[1]) float32."""
        return self.times_rows(x) if self.transposed else self.times_columns(x)

    def rows_dot(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each query's inner products with its own rows of this view: ids (N, k), x (N, d) -> (N, k)."""
        n_queries, k = ids.shape
        chunk = max(1, MAX_DEQUANTIZED // (k * x.shape[1]))
        out = torch.empty(n_queries, k)
        for start in range(0, n_queries, chunk):
            stop = min(start + chunk, n_queries)
            rows = self.rows(ids[start:stop].reshape(-1)).view(stop - start, k, -1)  # (n, k, d)
            out[start:stop] = torch.bmm(rows, x[start:stop].float().unsqueeze(2)).squeeze(2)
        return out

    def weighted_rows_sum(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[n, j] · row ids[n, j] of this view: ids, weights (N, k) -> (N, shape[1])."""
        n_queries, k = ids.shape
        chunk = max(1, MAX_DEQUANTIZED // (k * self.shape[1]))
        out = torch.empty(n_queries, self.shape[1])
        for start in range(0, n_queries, chunk):
            stop = min(start + chunk, n_queries)
            rows = self.rows(ids[start:stop].reshape(-1)).view(stop - start, k, -1)  # (n, k, d)
            out[start:stop] = torch.bmm(weights[start:stop].float().unsqueeze(1), rows).squeeze(1)
        return out


def supported_types() -> list[str]:
    return [qtype.name for qtype in FORMATS]


def quantized_linear(
    x: torch.Tensor, weight: torch.Tensor | QuantizedMatrix, bias: torch.Tensor | None
) -> torch.Tensor:
    """F.linear for a weight held as a tensor or as GGUF blocks: x (..., in) -> (..., out)."""
    if not isinstance(weight, QuantizedMatrix):
        return nn.functional.linear(x, weight, bias)
    y = weight.T.right_multiply(x.reshape(-1, x.shape[-1]))  # (N, out)
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], y.shape[-1])


class QuantizedLinear(nn.Module):
    """nn.Linear whose weight (out, in) stays in GGUF blocks; computes in float32."""

    def __init__(self, weight: QuantizedMatrix, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantized_linear(x, self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weight.qtype.name}"


class QuantizedEmbedding(nn.Module):
    """nn.Embedding whose table (vocab, dim) stays in GGUF blocks: a lookup de-quantizes the
    looked-up rows only."""

    def __init__(self, weight: QuantizedMatrix) -> None:
        super().__init__()
        self.weight = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)


def owned_blocks(data: np.ndarray) -> torch.Tensor:
    """A GGUF tensor's raw blocks (rows, row bytes) uint8, copied out of the file's memory map: a
    served model must not change when its file is rewritten."""
    return torch.from_numpy(np.array(data, dtype=np.uint8, copy=True))
