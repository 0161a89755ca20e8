"""CPU body of the dynamic-k expert layer: only the selected token-expert pairs are computed.

Runs inside the opaque custom op, so data-dependent indexing is allowed here (the CPU has no
device to synchronise with and nothing here is traced). One token (decode) gathers its selected
experts' weights in one step; larger batches loop over the experts that received tokens.
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
    if T == 1:
        idx = mask[0].nonzero().squeeze(1)
        # [k*e] hidden units of the selected experts, then one product with their output rows.
        h = _expert_hidden(
            x,
            w_in[idx].reshape(-1, d),
            None if w_up is None else w_up[idx].reshape(-1, d),
            None if b_in is None else b_in[idx].reshape(-1),
            activation,
        )
        out += (h @ w_out[idx].reshape(-1, d_out)).float()
    else:
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
