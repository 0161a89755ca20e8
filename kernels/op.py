"""The opaque custom op the vLLM plugin calls: ``torch.ops.d2dmoe.dynamic_k_experts``.

Router, selection and expert compute live behind one op so torch.compile and CUDA graphs see a
single node with a fixed output shape (a fake implementation gives it), whatever the routing, and
the CUDA body is free to fuse the router (``router.py``; off by default, see docs/kernels.md).
``counters`` (int64 [3]: tokens seen, token-expert pairs executed, and a semaphore the fused router
kernel leaves at 0) is updated on the device, so compute accounting costs no host synchronisation.
"""

from __future__ import annotations

import torch

from d2dmoe_kernels.cpu import dynamic_k_experts_cpu
from d2dmoe_kernels.reference import router_scores, select_experts

COUNTER_SLOTS = 3


@torch.library.custom_op("d2dmoe::dynamic_k_experts", mutates_args=("counters",))
def dynamic_k_experts(
    x: torch.Tensor,
    router_in: torch.Tensor,
    router_out: torch.Tensor,
    tau: float,
    top_k: int,
    expert_offset: int,
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    activation: str,
    counters: torch.Tensor,
) -> torch.Tensor:
    """x [T, d_in], router weights [w, d_in] and [E, w] -> [T, d_out] (d_out = w_out.shape[2]):
    selected experts summed + b_out.

    The expert weights may be a slice (tensor parallelism): local expert i is expert
    ``expert_offset + i`` of the router, selected against the maximum over all E experts."""
    mask = select_experts(router_scores(x, router_in, router_out), tau, top_k)
    mask = mask[:, expert_offset : expert_offset + w_in.shape[0]]
    counters[0] += mask.shape[0]
    counters[1] += mask.sum()
    return dynamic_k_experts_cpu(x, mask, w_in, w_up, w_out, b_in, b_out, activation)


@dynamic_k_experts.register_kernel("cuda")
def _dynamic_k_experts_cuda(x, router_in, router_out, tau, top_k, expert_offset, w_in, w_up, w_out, b_in, b_out,
                            activation, counters):
    # Triton kernels: router + decode / grouped / dense fallback, chosen from host-known sizes.
    from d2dmoe_kernels.dispatch import dynamic_k_experts_triton

    return dynamic_k_experts_triton(x, router_in, router_out, tau, top_k, w_in, w_up, w_out, b_in, b_out,
                                    activation, counters, expert_offset=expert_offset)


@dynamic_k_experts.register_fake
def _(x, router_in, router_out, tau, top_k, expert_offset, w_in, w_up, w_out, b_in, b_out, activation, counters):
    return x.new_empty(x.shape[0], w_out.shape[2])
