"""Small tensor kernels shared by the MLP module and the backends (no model code)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss
import numpy as np
import torch

from ann_mlp.quantized import QuantizedMatrix

# Below this many queries faiss searches on one thread. A parallel region over a few queries
# gains nothing, and inside a decode step faiss' OpenMP pool, spinning beside torch's own, fought
# it for the cores: an approximate one-token call took several times as long as on one thread.
PARALLEL_SEARCH_MIN_QUERIES = 16


@contextmanager
def search_threads(n_queries: int) -> Iterator[None]:
    """faiss on one thread within the block when there are too few queries to share out."""
    if n_queries >= PARALLEL_SEARCH_MIN_QUERIES:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


def rows_dot(
    rows: torch.Tensor | QuantizedMatrix, ids: torch.Tensor, x: torch.Tensor, max_gathered: int = 1 << 22
) -> torch.Tensor:
    """Inner products of each query with its own selected rows.

    rows (n, d) float32, bfloat16, float16 or GGUF blocks, ids (N, k), x (N, d) -> (N, k) float32.
    faiss scores float32 rows in place, without gathering copies of them (20x faster than gather +
    einsum at one query); 16-bit rows are gathered and GGUF rows de-quantized, each selected row once.
    Only when each query selects 40 % of the rows or more, in a batch of 8 or more, is one
    matmul per chunk of queries (then a gather) faster: it computes every row for every
    query, and its fixed cost is some 80 µs. Measured on 2 cores, random selections, in place
    vs matmul: 1536x385, 16 queries of 1024 rows 265 vs 171 µs, of 128 rows 32 vs 167 µs;
    4096x257, 64 queries of 1024 rows 756 vs 931 µs, of 1795 rows 1490 vs 1140 µs; 16384x4097,
    64 queries of 512 rows 16 vs 80 ms.
    """
    n_queries, k = ids.shape
    quantized = isinstance(rows, QuantizedMatrix)
    if quantized:
        # An index's augmented query [x; 1] meets a quantized key matrix, which has no bias
        # (KeyRowsIndex.hold_keys_like), with its rows' zero last coordinate.
        x = x[:, : rows.shape[1]]
    # GGUF blocks: de-quantizing a row costs more than the products with it, so the whole table
    # is de-quantized once as soon as the selections together outnumber its rows.
    if (quantized and n_queries * k > rows.shape[0]) or (5 * k >= 2 * rows.shape[0] and n_queries >= 8):
        chunk = max(1, max_gathered // rows.shape[0])  # the (chunk, n) scores stay bounded
        table = rows.float()
        out = torch.empty(n_queries, k, dtype=torch.float32)
        for start in range(0, n_queries, chunk):
            stop = start + chunk
            out[start:stop] = (x[start:stop].float() @ table.T).gather(1, ids[start:stop])
        return out
    if quantized:  # GGUF blocks: only the selected rows, de-quantized
        return rows.rows_dot(ids, x)
    if rows.dtype != torch.float32:  # bfloat16 or float16: only the selected rows, each once in float32
        return _gathered_rows_dot(rows, ids, x, max_gathered)
    table = rows.detach().contiguous().numpy()  # (n, d), no copy for a float32 parameter
    queries = np.ascontiguousarray(x.detach().numpy(), dtype=np.float32)  # (N, d)
    selected = np.ascontiguousarray(ids.numpy(), dtype=np.int64)  # (N, k)
    out = np.empty((n_queries, k), dtype=np.float32)
    faiss.fvec_inner_products_by_idx(
        faiss.swig_ptr(out),
        faiss.swig_ptr(queries),
        faiss.swig_ptr(table),
        faiss.swig_ptr(selected),
        table.shape[1],
        n_queries,
        k,
    )
    return torch.from_numpy(out)


def _gathered_rows_dot(rows: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, max_gathered: int) -> torch.Tensor:
    """rows_dot for 16-bit rows: rows (n, d), ids (N, k), x (N, d) -> (N, k) float32, gathering a
    chunk of queries' rows at a time into two buffers allocated once.

    The chunk bounds the gathered (chunk, k, d) rows (a batch of 1500 tokens at k = 352 of a
    2048-wide model would gather 4 GB at once). The buffers are reused because allocating them
    anew per chunk did not bound memory: freed blocks of a few to some 30 MB, interleaved with
    the small outputs, stayed with the C allocator, and 256 queries of 1890 bf16 rows of a
    2049-wide table left the process 1.7 GB larger.
    """
    n_queries, k = ids.shape
    d = rows.shape[1]
    chunk = min(n_queries, max(1, max_gathered // (k * d)))
    gathered = torch.empty(chunk * k, d, dtype=rows.dtype)  # (chunk·k, d) as stored
    widened = torch.empty(chunk, k, d)  # (chunk, k, d) float32
    out = torch.empty(n_queries, k)
    for start in range(0, n_queries, chunk):
        stop = min(start + chunk, n_queries)
        size = stop - start
        torch.index_select(rows, 0, ids[start:stop].reshape(-1), out=gathered[: size * k])
        widened[:size].copy_(gathered[: size * k].view(size, k, d))
        torch.bmm(widened[:size], x[start:stop].float().unsqueeze(2), out=out[start:stop].unsqueeze(2))
    return out


def round_up_16(n: int) -> int:
    """Counts and widths rounded to a multiple of 16, the SIMD width of faiss' scans (and of the
    candidate and k counts they read)."""
    return -(-n // 16) * 16


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens, as sentence-transformers pools MiniLM: (B, T, d), (B, T) -> (B, d)."""
    weights = mask.unsqueeze(-1).float()  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1)


def best_unordered(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Each row's `count` highest columns, in no particular order: scores (N, n) -> (N, count) int64.

    For candidates that are re-ranked anyway: a partial partition (numpy's introselect) took a
    quarter of the time of torch's sorted topk for 555 of 16,384 scores at one query.
    """
    n = scores.shape[1]
    if count >= n:
        return torch.arange(n).expand(scores.shape[0], n)
    return torch.from_numpy(np.argpartition(scores.numpy(), n - count, axis=1)[:, n - count :])


def best_candidates(
    rows: torch.Tensor, candidates: torch.Tensor, x: torch.Tensor, k: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact re-rank: each query's k best rows among its own candidates.

    rows (n, d), candidates (N, c) int64, x (N, d) -> (scores (N, k) float32, ids (N, k) int64),
    padded with -inf / -1 when there are fewer than k candidates. valid (N, c) bool: the
    candidates that count (None: all), at least k per query.
    """
    scores = rows_dot(rows, candidates, x)  # (N, c)
    if valid is not None:
        scores = scores.masked_fill(~valid, -torch.inf)
    top = scores.topk(min(k, candidates.shape[1]), dim=1)
    values, ids = top.values, candidates.gather(1, top.indices)
    if candidates.shape[1] < k:
        missing = k - candidates.shape[1]
        values = torch.nn.functional.pad(values, (0, missing), value=-torch.inf)
        ids = torch.nn.functional.pad(ids, (0, missing), value=-1)
    return values, ids


# Bits per dimension -> faiss' scalar quantizer of that width (the layouts RowCodes reads).
QUANTIZER_TYPES = {8: faiss.ScalarQuantizer.QT_8bit, 4: faiss.ScalarQuantizer.QT_4bit}


class RowCodes:
    """8- or 4-bit per-dimension codes of a table's rows, in faiss' QT_8bit / QT_4bit layout:
    row ≈ low + (code + 0.5) * step, with step = range / 255 (8 bits) or range / 15 (4 bits) per
    dimension; 4-bit codes pack two dimensions per byte, the even one in the low nibble.

    Scoring selected rows from 8-bit codes reads a quarter of their float32 bytes and lands
    within about 1 % of the exact inner products.
    """

    def __init__(self, codes: np.ndarray, ranges: np.ndarray, bits: int = 8) -> None:
        self.codes = torch.from_numpy(codes)  # (n, d) uint8, or (n, ⌈d/2⌉) packed at 4 bits
        self.ranges = ranges  # (2, d) float32: per-dimension minimum and range
        self.bits = bits
        low, width = torch.from_numpy(ranges)  # (d,), (d,)
        self.step = width / (2**bits - 1)  # (d,)
        self.offset = low + 0.5 * self.step  # (d,): the decoded value of code 0

    @classmethod
    def encode(cls, rows: np.ndarray, bits: int = 8) -> RowCodes:
        """rows (n, d) float32 -> their codes, each dimension quantized over its own range."""
        quantizer = faiss.ScalarQuantizer(rows.shape[1], QUANTIZER_TYPES[bits])
        quantizer.train(np.ascontiguousarray(rows, dtype=np.float32))
        ranges = faiss.vector_to_array(quantizer.trained).reshape(2, rows.shape[1])  # (2, d)
        return cls(quantizer.compute_codes(np.ascontiguousarray(rows, dtype=np.float32)), ranges, bits)

    @property
    def noise_variance(self) -> torch.Tensor:
        """(d,): each dimension's rounding error variance, step² / 12 (uniform within a step)."""
        return self.step.pow(2) / 12

    def _levels(self, codes: torch.Tensor) -> torch.Tensor:
        """Stored codes (..., code bytes) -> each dimension's level as float32 (..., d)."""
        if self.bits == 8:
            return codes.float()
        pairs = torch.stack([codes & 15, codes >> 4], dim=-1).flatten(-2)  # (..., 2·code bytes)
        return pairs[..., : len(self.step)].float()

    def decode(self) -> torch.Tensor:
        """The decoded rows: (n, d) float32."""
        return self.offset + self._levels(self.codes) * self.step

    def dot_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every query's inner products with every decoded row: x (N, d) -> (N, n)."""
        scaled = x * self.step  # (N, d)
        if self.bits == 8:
            return (self.codes.float() @ scaled.T).T + (x @ self.offset)[:, None]
        # Each nibble plane against its dimensions: half the time of interleaving them back (1536 x 112: 54 vs 104 µs).
        even, odd = scaled[:, 0::2], scaled[:, 1::2]  # (N, ⌈d/2⌉), (N, ⌊d/2⌋)
        odd = torch.nn.functional.pad(odd, (0, even.shape[1] - odd.shape[1]))  # an odd d's last high nibble is 0
        low, high = (self.codes & 15).float(), (self.codes >> 4).float()  # (n, ⌈d/2⌉) each
        return torch.addmm(low @ even.T, high, odd.T).T + (x @ self.offset)[:, None]

    def dot(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Each query's inner products with its own selected decoded rows: ids (N, c), x (N, d) -> (N, c).

        x · (offset + step ⊙ code) = x · offset + (x ⊙ step) · code. When the selections together
        outnumber the rows (large batches), the rows are decoded once and scored as rows_dot scores
        float rows: gathering every selection's codes would take N·c·d floats.
        """
        if ids.numel() > self.codes.shape[0]:
            return rows_dot(self.decode(), ids, x)
        # index_select, not codes[ids]: advanced indexing took 89 µs to gather 700 rows of 257 bytes, this 16 µs
        codes = self._levels(self.codes.index_select(0, ids.reshape(-1)).view(*ids.shape, -1))  # (N, c, d)
        return torch.bmm(codes, (x * self.step).unsqueeze(2)).squeeze(2) + (x @ self.offset)[:, None]
