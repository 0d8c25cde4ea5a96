"""ApproxMLP: an MLP computed from the top-k keys a MIPS index retrieves.

y = sum over retrieved i of act(k_i . x + b_i) [* (u_i . x + c_i)] * v_i + out_bias

First layer: the index returns the top-k keys of [x; 1] against [k_i; b_i].
Second layer: one fused weighted sum of k value rows (embedding_bag).
With k = d_ff and an exhaustive index this is the exact MLP.
Gated MLPs may retrieve more candidates than k by gate score and keep the k with
the largest |act(gate) * up|, estimated from 8-bit codes of the up rows.
A tail correction, fit at build time, stands in for the neurons left out: each
one's mean when dropped, and/or a low-rank linear map of [x; 1].
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ann_mlp.activations import activation_module
from ann_mlp.checkpoint.base import MlpWeights
from ann_mlp.errors import InputError
from ann_mlp.index.base import BYTES_PER_FLOAT, MipsIndex, SearchResult
from ann_mlp.linalg import RowCodes, rows_dot, search_threads
from ann_mlp.quantized import QuantizedMatrix, quantized_linear

# Rows per partial bag below which one token's value sum is not shared out among threads.
MIN_ROWS_PER_BAG = 128


def augmented_keys(weights: MlpWeights) -> np.ndarray:
    """[k_i; b_i] rows: (d_ff, d_model + 1) float32, the vectors every index holds."""
    bias = weights.key_bias if weights.key_bias is not None else torch.zeros(weights.d_ff)
    return torch.cat([weights.keys.float(), bias.float()[:, None]], dim=1).numpy()


def augmented_queries(x: torch.Tensor) -> np.ndarray:
    """[x; 1] rows: (N, d_model) -> (N, d_model + 1) float32, matching augmented_keys."""
    return torch.cat([x.float(), x.new_ones(x.shape[0], 1, dtype=torch.float32)], dim=1).numpy()


def dense_activations(weights: MlpWeights, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact MLP's first layer over all neurons: x (N, d_model) -> (scores, activations), each (N, d_ff).

    Scores are what the index ranks by (the gate for gated MLPs); activations are
    what multiplies the value rows (act(gate) * up for gated MLPs).
    """
    scores = torch.from_numpy(augmented_queries(x)) @ torch.from_numpy(augmented_keys(weights)).T  # (N, d_ff)
    activations = activation_module(weights.activation, weights.topk, weights.threshold)(scores)  # (N, d_ff)
    if weights.gated:
        up = x.float() @ weights.up.float().T  # (N, d_ff)
        activations = activations * (up + weights.up_bias if weights.up_bias is not None else up)
    return scores, activations


def exact_output(weights: MlpWeights, x: torch.Tensor) -> torch.Tensor:
    """The exact MLP's output, x (n, d_model) -> (n, d_model)."""
    return values_output(weights, dense_activations(weights, x)[1])


def values_output(weights: MlpWeights, activations: torch.Tensor) -> torch.Tensor:
    """The second layer over all neurons: activations (n, d_ff) -> output (n, d_model)."""
    y = activations @ weights.values.float()  # (n, d_model)
    return y if weights.out_bias is None else y + weights.out_bias.float()


@dataclass
class SearchStats:
    """Counters accumulated over forward calls (reset by the caller)."""

    queries: int = 0
    keys_scored: int = 0
    bytes_read: int = 0
    search_seconds: float = 0.0
    dense_tokens: int = 0  # tokens the planner sent down the dense path

    def reset(self) -> None:
        self.__init__()


class ApproxMLP(nn.Module):
    """Drop-in replacement for one MLP: same input and output shape (..., d_model)."""

    def __init__(
        self,
        weights: MlpWeights,
        index: MipsIndex,
        k: int,
        search_params: dict | None = None,
        tail_mean: torch.Tensor | None = None,
        tail_map: torch.Tensor | None = None,
        candidates: int | None = None,
        up_codes: torch.Tensor | None = None,
        up_ranges: torch.Tensor | None = None,
        neuron_order: torch.Tensor | None = None,
    ) -> None:
        """neuron_order: (d_ff,) int64 when the model's neurons were put in the order of the index's
        table (approx_model.share_layer_tables): weights' neuron p is the index's key neuron_order[p].
        Search ids (the checkpoint's neuron numbers) are then mapped to the model's neurons, and
        tail_mean and up_codes, stored in the checkpoint's order, are put in the model's."""
        super().__init__()
        if not 1 <= k <= weights.d_ff:
            raise InputError(f"k must be in [1, d_ff={weights.d_ff}], got {k}")
        # The model's neuron for each index id, and -1 at the end, where id -1 (nothing found) reads.
        self.neuron_of_id = (
            None if neuron_order is None else np.append(torch.argsort(neuron_order).numpy(), -1)
        )  # (d_ff + 1,)
        if neuron_order is not None:
            tail_mean = None if tail_mean is None else tail_mean[neuron_order]
            up_codes = None if up_codes is None else up_codes[neuron_order]
        self.weights = weights
        self.quantized = isinstance(weights.values, QuantizedMatrix)
        self.index = index
        self.k = k
        # Neurons retrieved by key score per token; when above k, the k with the largest
        # |contribution| (gated: |act(gate) * up|, which the gate alone ranks poorly) are kept.
        self.candidates = max(k, candidates or k)
        # Gated: 8-bit codes of the up rows (d_ff, d_model) estimate the candidates' up scores for that
        # choice, a quarter of the bytes of scoring them exactly; without codes they are scored exactly.
        self.up_codes = None if up_codes is None else RowCodes(up_codes.numpy(), up_ranges.numpy())
        self.search_params = dict(search_params or {})
        # The activation module's forward, called directly: Module.__call__'s hook handling cost
        # a third of the glue at batch 1.
        self.act = ACT2FN[weights.activation].forward
        # embedding_bag gathers rows of a contiguous (d_ff, d_model) table, in the model's dtype;
        # a GGUF model's value rows stay columns of its quantized down matrix.
        self.value_rows = weights.values if self.quantized else weights.values.contiguous()  # (d_ff, d_model)
        self.dense_act = activation_module(weights.activation, weights.topk, weights.threshold)
        # Tail correction: neurons not retrieved contribute their mean when not in the top k (build.dropped_mean),
        # y = sum_retrieved (h_i - m_i) v_i + sum_all m_i v_i; exact when all are retrieved.
        self.tail_mean = None if tail_mean is None else tail_mean.float()  # (d_ff,)
        tail_sum = None if tail_mean is None else self.tail_mean @ self.value_rows.float()  # (d_model,)
        # What is added to every output row: the output bias and the tail's mean contribution, summed once.
        terms = [t.float() for t in (weights.out_bias, tail_sum) if t is not None]
        self.out_sum = None if not terms else sum(terms)  # (d_model,)
        # Linear tail map (build.fit_tail_map), fit to what the selection as built leaves out:
        # y += ([x; 1] P) Q, applied only to that selection (at another k or number of
        # candidates, other neurons are left out).
        self.fitted_selection = (self.k, self.candidates)
        if tail_map is not None:
            rank_rows = tail_map.float()  # (r, D + d_model): row j = [p_j; q_j]
            self.map_in = rank_rows[:, : weights.d_model].contiguous()  # (r, d_model)
            self.map_in_bias = rank_rows[:, weights.d_model].contiguous()  # (r,)
            self.map_out = rank_rows[:, weights.d_model + 1 :].contiguous()  # (r, d_model)
            self.map_bytes = rank_rows.numel() * BYTES_PER_FLOAT
        else:
            self.map_in = self.map_in_bias = self.map_out = None
        self._query_buffer = np.ones((0, weights.d_model + 1), dtype=np.float32)
        self._bag_offsets, self._bag_width = torch.zeros(0, dtype=torch.int64), 0
        # Planner: calls with more tokens than this run dense (None: always approximate).
        self.approx_up_to: int | None = None
        self.stats = SearchStats()

    def extra_repr(self) -> str:
        return f"k={self.k}, index={self.index}, search={self.search_params}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.approx_up_to is not None and hidden_states.numel() > self.approx_up_to * self.weights.d_model:
            return self.dense_forward(hidden_states)
        return self.forward_with_selection(hidden_states)[0]

    def dense_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The exact MLP over all d_ff neurons, in the model's dtype: the planner's path where
        search does not pay."""
        w = self.weights
        shape = hidden_states.shape
        dtype = torch.float32 if self.quantized else w.keys.dtype  # GGUF blocks compute in float32
        x = hidden_states.reshape(-1, w.d_model).to(dtype)  # (N, d_model)
        h = self.dense_act(quantized_linear(x, w.keys, w.key_bias))  # (N, d_ff)
        if w.gated:
            h = h * quantized_linear(x, w.up, w.up_bias)
        y = self.value_rows.right_multiply(h) if self.quantized else h @ self.value_rows  # (N, d_model)
        if w.out_bias is not None:
            y = y + w.out_bias
        self.stats.dense_tokens += x.shape[0]
        return y.reshape(shape).to(hidden_states.dtype)

    def augmented(self, x: torch.Tensor) -> np.ndarray:
        """[x; 1] rows in a buffer reused across calls: x (N, d_model) -> (N, d_model + 1) float32.

        Calls are serialised (one engine worker), and no index keeps its queries,
        so one growing buffer saves allocating and concatenating on every call.
        """
        if self._query_buffer.shape[0] < x.shape[0]:
            self._query_buffer = np.ones(
                (max(x.shape[0], 2 * self._query_buffer.shape[0]), self.weights.d_model + 1), dtype=np.float32
            )
        queries = self._query_buffer[: x.shape[0]]  # (N, d_model + 1), last column stays 1
        np.copyto(queries[:, :-1], x.detach().numpy())
        return queries

    def weighted_value_sum(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_j weights[n, j] * value_rows[ids[n, j]]: ids, weights (N, k) -> (N, d_model).

        One fused gather-and-sum (embedding_bag with per-sample weights), called through
        torch.embedding_bag: the functional wrapper's checks cost as much as the kernel at batch 1.
        A bfloat16 or float16 table is summed in its dtype, as the model's own second layer is.
        embedding_bag shares out bags, not rows, among threads: a single token's sum is cut into
        one bag per thread and the partial sums added (512 rows of 1024: 105 vs 40 µs on 2 threads).
        """
        if self.quantized:  # each kept value row de-quantized from the down matrix's blocks
            return self.value_rows.weighted_rows_sum(ids, weights)
        n, k = ids.shape
        parts = min(torch.get_num_threads(), k // MIN_ROWS_PER_BAG) if n == 1 else 1
        bags, width = (parts, -(-k // parts)) if parts > 1 else (n, k)  # the last part may be shorter
        if self._bag_offsets.shape[0] < bags or self._bag_width != width:
            self._bag_width = width
            self._bag_offsets = torch.arange(0, max(bags, 64) * width, width)  # (bags,): where each bag starts
        sum_mode = 0
        sums = torch.embedding_bag(
            self.value_rows,
            ids.reshape(-1),
            self._bag_offsets[:bags],
            False,
            sum_mode,
            False,
            weights.reshape(-1).to(self.value_rows.dtype),
            False,
            None,
        )[0].float()  # (bags, d_model)
        return sums.sum(0, keepdim=True) if parts > 1 else sums

    def up_scores(self, ids: torch.Tensor, x: torch.Tensor, codes: RowCodes | None = None) -> torch.Tensor:
        """Gated: u_i . x + c_i for each token's own neurons, exactly or from 8-bit codes:
        ids (N, c), x (N, d_model) -> (N, c)."""
        up = rows_dot(self.weights.up, ids, x) if codes is None else codes.dot(ids, x)  # (N, c)
        return up if self.weights.up_bias is None else up + self.weights.up_bias.float()[ids]

    def forward_with_selection(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, SearchResult]:
        """(output (..., d_model), kept ids (N, k) with -1 for none, the raw search result).

        c = max(k, candidates) neurons are retrieved per token; k of them are kept.
        """
        w = self.weights
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, w.d_model).float()  # (N, d_model)

        search_start = time.perf_counter()
        with search_threads(len(x)):
            result = self.index.search(self.augmented(x), max(self.k, self.candidates), **self.search_params)
        search_seconds = time.perf_counter() - search_start

        found = result.ids if self.neuron_of_id is None else self.neuron_of_id[result.ids]  # (N, c)
        retrieved = torch.from_numpy(found)  # (N, c), -1 = nothing found
        # Usually every slot is filled; masking only when one is not keeps the batch-1 glue small.
        all_found = bool(found.min() >= 0)
        missing = None if all_found else torch.from_numpy(found < 0)  # (N, c) bool
        ids = retrieved if all_found else torch.from_numpy(np.maximum(found, 0))  # (N, c), valid rows
        scores = torch.from_numpy(result.scores)  # (N, c): exact, or the index's approximation
        silent = missing  # (N, c) bool: slots that contribute nothing (None: none)
        if w.topk and w.topk < self.k:  # Top-k model: only the K best of the retrieved fire
            ranked = scores if missing is None else scores.masked_fill(missing, -torch.inf)
            best = ranked.topk(w.topk, dim=1).indices  # (N, K)
            beyond = torch.ones_like(retrieved, dtype=torch.bool).scatter_(1, best, False)  # (N, c)
            silent = beyond if silent is None else silent | beyond
        if w.threshold is not None:  # FATReLU: neurons at or below the threshold do not fire
            below = scores <= w.threshold
            silent = below if silent is None else silent | below
        activations = self.act(scores)  # (N, c)
        if silent is not None:
            activations = activations.masked_fill(silent, 0.0)
        choosing = self.candidates > self.k
        by_codes = w.gated and choosing and self.up_codes is not None
        if w.gated and not by_codes:
            activations = activations * self.up_scores(ids, x)  # (N, c)
        if choosing:  # keep the k largest contributions of the candidates
            contributions = activations * self.up_scores(ids, x, self.up_codes) if by_codes else activations
            kept = contributions.abs().topk(self.k, dim=1).indices  # (N, k)
            activations, ids, retrieved = activations.gather(1, kept), ids.gather(1, kept), retrieved.gather(1, kept)
            missing = None if missing is None else missing.gather(1, kept)
            if w.gated:  # read only to choose: every candidate's up code, or the exact up rows of those not kept
                per_token = (
                    self.candidates * w.d_model
                    if by_codes
                    else round((self.candidates - self.k) * w.d_model * w.up.element_size())
                )
                result = replace(result, bytes_read=result.bytes_read + len(x) * per_token)
        if by_codes:
            activations = activations * self.up_scores(ids, x)  # (N, k): the exact up of the k kept only
        if self.tail_mean is not None:
            expected = self.tail_mean[ids]  # (N, k): already counted in the tail's sum
            activations = activations - (expected if missing is None else expected.masked_fill(missing, 0.0))
        y = self.weighted_value_sum(ids, activations)  # (N, d_model)
        if self.out_sum is not None:
            y += self.out_sum
        if self.map_out is not None and (self.k, self.candidates) == self.fitted_selection:
            y.addmm_(F.linear(x, self.map_in, self.map_in_bias), self.map_out)  # (N, r) @ (r, d_model)
            result = replace(result, bytes_read=result.bytes_read + len(x) * self.map_bytes)

        stats = self.stats
        stats.queries += x.shape[0]
        stats.keys_scored += result.keys_scored
        stats.bytes_read += result.bytes_read
        stats.search_seconds += search_seconds
        y = y.view(*shape)  # unpacked: a torch.Size argument costs a microsecond more
        return y if y.dtype == hidden_states.dtype else y.to(hidden_states.dtype), retrieved, result
