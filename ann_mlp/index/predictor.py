"""Deja Vu-style learned neuron predictor (Liu et al. 2023), as a peer of the analytic `lowrank` backend.

A rank-r linear network q -> (q W1) W2 (Deja Vu's MLP-sparsity predictor: two
linear layers, no nonlinearity) is trained with binary cross-entropy to predict,
for each neuron, whether it is in the query's exact top-k, on real calibration
queries. The `rerank` candidates with the highest predicted logits are then
scored exactly. Same search shape as `lowrank`; the difference is how the
low-rank scorer is obtained (trained vs fit to the scores) and that its weights
are read as floats, not 8-bit codes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ann_mlp.errors import BackendError
from ann_mlp.index.base import BYTES_PER_FLOAT, KeyRowsIndex, SearchResult
from ann_mlp.linalg import best_candidates


class NeuronPredictorIndex(KeyRowsIndex):
    name = "dejavu"
    scores_rows_only = True
    effort_param = "rerank"  # candidates re-scored exactly per query
    needs_queries = True
    parts = ("first", "second")

    def __init__(
        self,
        keys: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
        build_params: dict[str, Any],
        search_params: dict[str, Any],
    ) -> None:
        super().__init__(keys, build_params, search_params)
        self.first = torch.from_numpy(np.ascontiguousarray(first, dtype=np.float32))  # (D, r)
        self.second = torch.from_numpy(np.ascontiguousarray(second, dtype=np.float32))  # (r, n)

    @classmethod
    def default_build_params(cls, num_keys: int, dim: int) -> dict[str, Any]:
        return {"rank": int(min(dim, max(8, dim // 64 * 8))), "steps": 400, "batch": 256, "lr": 1e-2, "seed": 0}

    @classmethod
    def build(
        cls,
        keys: np.ndarray,
        queries: np.ndarray | None = None,
        k: int | None = None,
        target_recall: float | None = None,
        **build_params: Any,
    ) -> NeuronPredictorIndex:
        if queries is None or len(queries) == 0 or k is None:
            raise BackendError("the dejavu backend is trained on calibration queries and k")
        params = {**cls.default_build_params(*keys.shape), **build_params}
        generator = torch.Generator().manual_seed(int(params["seed"]))
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (N, D)
        key_t = torch.from_numpy(keys)
        # Inputs are scaled to unit RMS per coordinate inside the first layer, so one learning
        # rate fits every model (RMS, not std: the constant bias coordinate must stay 1).
        scale = q.pow(2).mean(0).sqrt().clamp_min(1e-6)  # (D,)
        first = torch.nn.Parameter(
            torch.randn(keys.shape[1], params["rank"], generator=generator) / keys.shape[1] ** 0.5
        )
        second = torch.nn.Parameter(torch.zeros(params["rank"], keys.shape[0]))
        optimizer = torch.optim.Adam([first, second], lr=params["lr"])
        for _ in range(params["steps"]):
            batch = q[torch.randint(len(q), (params["batch"],), generator=generator)]  # (b, D)
            target = torch.zeros(len(batch), keys.shape[0])
            target.scatter_(1, (batch @ key_t.T).topk(k, dim=1).indices, 1.0)  # (b, n) multi-hot
            logits = ((batch / scale) @ first) @ second  # (b, n)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        folded = (first.detach() / scale[:, None]).numpy()  # (D, r): standardisation folded in
        return cls(keys, folded, second.detach().numpy(), params, {})

    def search(self, queries: np.ndarray, k: int, **search_params: Any) -> SearchResult:
        rerank = self.resolve_effort(k, search_params)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))  # (N, D)
        candidates = ((q @ self.first) @ self.second).topk(rerank, dim=1).indices  # (N, rerank)
        values, ids = best_candidates(self.keys, candidates, q, k)
        predictor_bytes = (self.first.numel() + self.second.numel()) * BYTES_PER_FLOAT
        return SearchResult(
            values.numpy(),
            ids.numpy(),
            keys_scored=len(q) * self.num_keys,
            bytes_read=round(len(q) * (predictor_bytes + rerank * self.dim * self.keys.element_size())),
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {"first": self.first.numpy(), "second": self.second.numpy()}
