"""Balanced k-means of FFN neurons into equal-size experts (the paper's expert split).

Neurons are the L2-normalised rows of the first layer (the gate for Gemma). Each iteration assigns
neurons to centroids greedily by cosine similarity under a capacity of d_ff / E per expert (the most
similar (neuron, expert) pairs first), then re-centres. Deterministic for a given seed.
"""

from __future__ import annotations

import torch


def _balanced_assign(sim: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy capacity-constrained assignment: neuron -> cluster, every cluster gets ``capacity``."""
    n, k = sim.shape
    order = torch.argsort(sim.flatten(), descending=True, stable=True)
    assign = torch.full((n,), -1, dtype=torch.long)
    load = torch.zeros(k, dtype=torch.long)
    left = n
    for flat in order.tolist():
        i, c = divmod(flat, k)
        if assign[i] < 0 and load[c] < capacity:
            assign[i] = c
            load[c] += 1
            left -= 1
            if left == 0:
                break
    return assign


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
