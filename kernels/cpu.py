"""CPU body of the dynamic-k expert layer: experts no token selected are skipped, unselected pairs add nothing.

Runs inside the opaque custom op, so data-dependent indexing is allowed here (the CPU has no
device to synchronise with and nothing here is traced). Two strategies, chosen per call from the
mask (``RUNS_MIN_DENSITY``, measured on a 2-core host with ``benchmarks/bench_cpu_op.py``): for
small batches, or when the experts in play are used by enough of the tokens, one product per run
of consecutive experts that any token selected (weight views, no copies; unselected pairs zeroed);
otherwise a loop over the experts that received tokens, computing only the selected pairs.
"""

from __future__ import annotations

import torch

from d2dmoe_kernels.reference import apply_activation


def _expert_hidden(xs, w_in, w_up, b_in, activation):
    """act(xs W_in^T + b_in) * (xs W_up^T) for 2-D weight blocks [n, d]."""
    h = xs @ w_in.t()
    if b_in is not None:
        h = h + b_in
    h = apply_activation(h, activation)
    if w_up is not None:
        h = h * (xs @ w_up.t())
    return h


# (max tokens, min density): products over runs of the experts in play when the density (selected
# pairs / (tokens x experts in play)) reaches the bound for the batch size; measured on a 2-core
# host (benchmarks/bench_cpu_op.py): small batches always, up to 64 tokens from a third, above from 2/3.
RUNS_MIN_DENSITY = ((16, 0.0), (64, 1 / 3), (float("inf"), 2 / 3))


def by_runs(mask: torch.Tensor, used: torch.Tensor) -> bool:
    """The strategy for a [T, E] mask whose experts in play are ``used`` ([E], ``mask.any(0)``):
    products over runs of those experts (True) or the loop over experts computing only the
    selected pairs (False)."""
    T = mask.shape[0]
    bound = next(density for tokens, density in RUNS_MIN_DENSITY if T <= tokens)
    return int(mask.sum()) >= bound * T * int(used.sum())


def _runs(experts: list[int]) -> list[tuple[int, int]]:
    """Sorted expert indices -> [start, stop) runs of consecutive ones: [1, 2, 3, 7] -> [(1, 4), (7, 8)]."""
    runs = []
    for e in experts:
        if runs and runs[-1][1] == e:
            runs[-1] = (runs[-1][0], e + 1)
        else:
            runs.append((e, e + 1))
    return runs


def dynamic_k_experts_cpu(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    T, d = x.shape
    E, e, _ = w_in.shape
    d_out = w_out.shape[2]  # may differ from d (attention projections as experts)
    out = torch.zeros(T, d_out, dtype=torch.float32, device=x.device)
    used = mask.any(dim=0)
    if by_runs(mask, used):
        # The experts any token selected, as runs of consecutive experts: contiguous weight blocks,
        # one product per run on views (no copy), unselected (token, expert) pairs zeroed. One token:
        # exactly its experts; every expert selected: the dense MLP.
        for a, b in _runs(used.nonzero().squeeze(1).tolist()):
            h = _expert_hidden(
                x,
                w_in[a:b].reshape(-1, d),
                None if w_up is None else w_up[a:b].reshape(-1, d),
                None if b_in is None else b_in[a:b].reshape(-1),
                activation,
            )
            if T > 1:
                h.view(T, b - a, e).masked_fill_(~mask[:, a:b, None], 0.0)
            out += (h @ w_out[a:b].reshape(-1, d_out)).float()
    else:  # many tokens, each using few of the experts in play: only the selected pairs, expert by expert
        pairs = mask.t().nonzero()  # (expert, token), grouped by expert
        counts = mask.sum(dim=0).tolist()
        start = 0
        for expert, n in enumerate(counts):
            if n == 0:
                continue
            tokens = pairs[start : start + n, 1]
            start += n
            h = _expert_hidden(
                x[tokens],
                w_in[expert],
                None if w_up is None else w_up[expert],
                None if b_in is None else b_in[expert],
                activation,
            )
            out.index_add_(0, tokens, (h @ w_out[expert]).float())
    if b_out is not None:
        out += b_out.float()
    return out.to(x.dtype)
