"""Balanced k-means split: equal experts, every neuron once, deterministic, finds planted clusters."""

import pytest
import torch

from d2dmoe_converter.kmeans import balanced_kmeans_order


def test_balanced_permutation_and_deterministic():
    rows = torch.randn(384, 48)
    order = balanced_kmeans_order(rows, 12, seed=3)
    assert sorted(order.tolist()) == list(range(384))            # every neuron exactly once, 32 per expert
    assert torch.equal(order, balanced_kmeans_order(rows, 12, seed=3))


def test_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    E, size, d = 8, 16, 32
    centres = torch.nn.functional.normalize(torch.randn(E, d, generator=g), dim=1)
    label = torch.arange(E).repeat_interleave(size)
    rows = centres[label] * (1 + torch.rand(E * size, 1, generator=g)) + 0.05 * torch.randn(E * size, d, generator=g)
    perm = torch.randperm(E * size, generator=g)                 # shuffle so contiguous would be wrong
    order = balanced_kmeans_order(rows[perm], E, seed=1)
    groups = label[perm][order].reshape(E, size)
    assert all(len(set(gr.tolist())) == 1 for gr in groups)       # each expert = one planted cluster
    contiguous = label[perm].reshape(E, size)
    assert not all(len(set(gr.tolist())) == 1 for gr in contiguous)


def test_rejects_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="7 experts do not divide d_ff = 30"):
        balanced_kmeans_order(torch.randn(30, 4), 7)
