"""Balanced k-means of FFN neurons into equal-size experts (the paper's expert split).

Neurons are the L2-normalised rows of the first layer (the gate for Gemma). Each iteration assigns
neurons to centroids by cosine similarity under a capacity of d_ff / E per expert, then re-centres.
Deterministic for a given seed.
"""

from __future__ import annotations

import torch


def _balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Capacity-constrained assignment, every cluster gets exactly ``capacity`` neurons.

    Rounds of first choices: each unassigned neuron bids for its most similar cluster that still has
    room; a cluster accepts its strongest bids up to its free room. Vectorised; a few rounds."""
    n, k = sim.shape
    assign = torch.full((n,), -1, dtype=torch.long)
    load = torch.zeros(k, dtype=torch.long)
    while True:
        free = (assign < 0).nonzero().squeeze(1)
        if free.numel() == 0:
            return assign
        bids = sim[free].masked_fill((load >= capacity)[None, :], float("-inf"))
        value, choice = bids.max(dim=1)
        order = torch.argsort(choice.double() * 4.0 - value.double().clamp(-1, 1), stable=True)  # by cluster, best first
        choice, free = choice[order], free[order]
        first = torch.searchsorted(choice, choice, right=False)       # index of each cluster's first bid
        rank = torch.arange(choice.numel()) - first
        take = rank < (capacity - load)[choice]
        assign[free[take]] = choice[take]
        load += torch.bincount(choice[take], minlength=k)


def balanced_kmeans_order(rows: torch.Tensor, num_experts: int, seed: int = 0, iters: int = 15) -> torch.Tensor:
    """Permutation of the d_ff neurons: expert e owns positions [e*size, (e+1)*size) of the result."""
    d_ff = rows.shape[0]
    if d_ff % num_experts:
        raise ValueError(f"{num_experts} experts do not divide d_ff = {d_ff}")
    size = d_ff // num_experts
    x = torch.nn.functional.normalize(rows.float(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(d_ff, generator=gen)[:num_experts]].clone()
    assign = None
    for _ in range(iters):
        new = _balanced_assign(x @ centroids.t(), size)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        centroids = torch.nn.functional.normalize(sums, dim=1)
    # experts in cluster order, neurons inside an expert in their original order
    return torch.argsort(assign * d_ff + torch.arange(d_ff), stable=True)
