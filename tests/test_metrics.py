from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ann_mlp.metrics import (
    mass_recall,
    nearest_neighbour_agreement,
    recall_at_k,
    relative_errors,
    total_relative_error,
)


def test_recall_is_tie_aware():
    scores = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0]])
    # top-2 is {0} plus any one of the tied 3.0s
    assert recall_at_k(scores, torch.tensor([[0, 3]]), 2).item() == 1.0
    assert recall_at_k(scores, torch.tensor([[2, 1]]), 2).item() == 0.5
    assert recall_at_k(scores, torch.tensor([[0, -1]]), 2).item() == 0.5
    assert recall_at_k(scores, torch.tensor([[4, -1]]), 2).item() == 0.0


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 30), st.integers(0, 10_000))
def test_recall_of_the_exact_top_k_is_one(k, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 5, (4, 30), generator=generator).float()  # many ties
    top = scores.topk(k, dim=1).indices
    assert torch.all(recall_at_k(scores, top, k) == 1.0)
    assert torch.all(recall_at_k(scores, top[:, : k // 2].repeat(1, 1), k) <= 0.5 + 1e-6)


def test_mass_recall_counts_absolute_activation():
    activations = torch.tensor([[2.0, -1.0, 1.0, 0.0]])
    assert mass_recall(activations, torch.tensor([[0, 1]])).item() == 0.75
    assert mass_recall(activations, torch.tensor([[0, -1]])).item() == 0.5


def test_neighbour_agreement():
    exact = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_neighbour_agreement(exact, exact) == 1.0
    swapped = exact[[0, 2, 1, 3]]  # rows 1 and 2 trade places
    assert nearest_neighbour_agreement(exact, swapped) < 1.0


def test_relative_errors_are_per_token():
    exact = torch.tensor([[100.0, 0.0], [1.0, 0.0]])
    approx = torch.tensor([[100.0, 0.0], [0.0, 0.0]])
    # the large row is exact, the small one entirely wrong: per-token errors 0 and 1
    assert relative_errors(approx, exact).tolist() == [0.0, 1.0]


def test_total_relative_error_weighs_rows_by_their_size():
    exact = torch.tensor([[10.0, 0.0], [0.0, 1.0]])
    assert total_relative_error(exact, exact) == 0.0
    assert total_relative_error(torch.zeros_like(exact), exact) == pytest.approx(1.0)
    # a 10 % error on the large row: 1 / sqrt(101) of the total; the per-row mean halves it to 5 %
    approx = torch.tensor([[11.0, 0.0], [0.0, 1.0]])
    assert total_relative_error(approx, exact) == pytest.approx(1 / 101**0.5)
    assert relative_errors(approx, exact).mean().item() == pytest.approx(0.05)
