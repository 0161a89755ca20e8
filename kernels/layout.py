"""Stacked first-layer weights: w_in, w_up and the router's first layer back to back in one buffer.

The plugin allocates a layer's input-side weights this way (``stack_up_weights``), so one cuBLAS GEMM
over the buffer computes the experts' first layer and the router's hidden layer together
(``expert_masked_gemm.py``): the router costs a few % more GEMM columns instead of a launch. The
tensors stay ordinary parameters (views of the buffer), loaded by name as before; code that never
uses the stacked view (CPU body, other kernels) sees no difference.

    rows [0, E*e)                  w_in  [E, e, d]
    rows [E*e, 2*E*e)   (gated)    w_up  [E, e, d]
    rows [-w:]                     router_in [w, d]
"""

from __future__ import annotations

import torch


def stack_up_weights(num_experts: int, expert_size: int, d_in: int, router_width: int, gated: bool,
                     dtype: torch.dtype | None = None, device=None):
    """(w_in [E, e, d], w_up [E, e, d] or None, router_in [w, d]): uninitialised views of one buffer."""
    rows = num_experts * expert_size
    buf = torch.empty((rows * (2 if gated else 1) + router_width, d_in), dtype=dtype, device=device)
    w_in = buf[:rows].view(num_experts, expert_size, d_in)
    w_up = buf[rows : 2 * rows].view(num_experts, expert_size, d_in) if gated else None
    return w_in, w_up, buf[buf.shape[0] - router_width :]


def stacked_up_view(w_in: torch.Tensor, w_up: torch.Tensor | None, router_in: torch.Tensor) -> torch.Tensor | None:
    """The [E*e (x2 if gated) + w, d] matrix over w_in, w_up and router_in when they lie back to back
    in one storage, in that order (as ``stack_up_weights`` lays them out); else None."""
    parts = [w_in] + ([] if w_up is None else [w_up]) + [router_in]
    d = w_in.shape[-1]
    if any(p.dtype != w_in.dtype or p.device != w_in.device or not p.is_contiguous() or p.shape[-1] != d
           for p in parts):
        return None
    storage = w_in.untyped_storage().data_ptr()
    if any(p.untyped_storage().data_ptr() != storage for p in parts):
        return None
    for a, b in zip(parts, parts[1:]):
        if b.data_ptr() != a.data_ptr() + a.numel() * a.element_size():
            return None
    rows = sum(p.numel() for p in parts) // d
    return torch.as_strided(w_in, (rows, d), (d, 1))
