"""Tests of the visible-token budget and its split across modalities."""

from __future__ import annotations

import math

import pytest
import torch

from morpheus_pl.nn import choose_visible, sample_visible, split_budget, visible_budget


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.75, 0.8, 0.9, 1.0])
def test_visible_budget_is_exact_floor(ratio):
    tokens = torch.arange(0, 400)
    expected = [math.floor(round(t * (1 - ratio), 9)) for t in tokens.tolist()]
    assert visible_budget(tokens, ratio).tolist() == expected


def test_budget_floor_not_lost_to_rounding():
    assert visible_budget(torch.tensor([50]), 0.8).item() == 10


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.9])
def test_split_sums_exactly_and_respects_capacity(ratio):
    gen = torch.Generator().manual_seed(0)
    sizes = [50, 7, 30]
    present = torch.rand(2000, 3, generator=gen) > 0.3
    counts = split_budget(sizes, present, ratio, gen)
    capacity = torch.tensor(sizes) * present
    budget = visible_budget(capacity.sum(1), ratio)
    assert torch.equal(counts.sum(1), budget)
    assert torch.all(counts <= capacity)
    assert torch.all(counts >= 0)
    assert torch.all(counts[~present] == 0)


def test_split_uses_every_modality_sometimes():
    gen = torch.Generator().manual_seed(1)
    present = torch.ones(500, 3, dtype=torch.bool)
    counts = split_budget([50, 50, 50], present, 0.75, gen)
    # Dirichlet shares: every modality gets the largest share in some samples.
    assert set(counts.argmax(1).tolist()) == {0, 1, 2}
    assert counts.float().mean(0).min() > 8


def test_sample_visible_counts_per_modality_and_total():
    gen = torch.Generator().manual_seed(2)
    sizes = [50, 50, 20]
    present = torch.ones(64, 3, dtype=torch.bool)
    present[::3, 1] = False
    visible = sample_visible(sizes, present, 0.75, gen)
    per_modality = torch.stack([v.sum(1) for v in visible], dim=1)
    n_tokens = (torch.tensor(sizes) * present).sum(1)
    assert torch.equal(per_modality.sum(1), torch.floor(n_tokens * 0.25).long())
    assert torch.all(per_modality[::3, 1] == 0)


def test_choose_visible_exact_counts():
    gen = torch.Generator().manual_seed(3)
    counts = torch.tensor([0, 1, 5, 10])
    visible = choose_visible(counts, 10, gen)
    assert visible.sum(1).tolist() == [0, 1, 5, 10]


def test_no_modality_present_gives_no_token():
    counts = split_budget([5, 5], torch.zeros(3, 2, dtype=torch.bool), 0.5)
    assert counts.sum().item() == 0
