"""The opaque custom op the vLLM plugin calls: ``torch.ops.d2dmoe.dynamic_k_experts``.

Router, selection and expert compute live behind one op so torch.compile and CUDA graphs see a
single node with a fixed output shape (a fake implementation gives it), whatever the routing, and
the CUDA body is free to fuse the router (``router.py``; off by default, see docs/kernels.md).
``counters`` (int64 [3]: tokens seen, token-expert pairs executed, and a semaphore the fused router
kernel leaves at 0) is updated on the device, so compute accounting costs no host synchronisation.

Registered directly (schema + one kernel per backend, as vLLM's ``direct_register_custom_op``),
not with ``torch.library.custom_op``: that decorator's autograd / ADInplaceOrView wrappers cost
20-60 us of host time per call on an H200 host (``benchmarks/results/attempts/15-*``), which
eager token counts (prefill chunks above the largest CUDA graph) pay once per layer. The op has no
autograd formula: it serves inference only.
"""

from __future__ import annotations

import torch

from d2dmoe_kernels.cpu import dynamic_k_experts_cpu
from d2dmoe_kernels.reference import router_scores, select_experts

COUNTER_SLOTS = 3
SCHEMA = ("dynamic_k_experts(Tensor x, Tensor router_in, Tensor router_out, float tau, int top_k, int expert_offset, "
          "Tensor w_in, Tensor? w_up, Tensor w_out, Tensor? b_in, Tensor? b_out, str activation, "
          "Tensor(a!) counters, str reference=\"max\") -> Tensor")

_lib = torch.library.Library("d2dmoe", "DEF")  # module-level: the registrations live as long as the process
_lib.define(SCHEMA)


def dynamic_k_experts_host(x, router_in, router_out, tau, top_k, expert_offset, w_in, w_up, w_out, b_in, b_out,
                           activation, counters, reference="max"):
    """x [T, d_in], router weights [w, d_in] and [E, w] -> [T, d_out] (d_out = w_out.shape[2]):
    selected experts summed + b_out (the CPU body: torch, same rule as the reference).

    The expert weights may be a slice (tensor parallelism): local expert i is expert
    ``expert_offset + i`` of the router, selected against the reference over all E experts (``reference``:
    what tau is a fraction of, ``selection_rule``)."""
    mask = select_experts(router_scores(x, router_in, router_out), tau, top_k, reference)
    mask = mask[:, expert_offset : expert_offset + w_in.shape[0]]
    counters[0] += mask.shape[0]
    counters[1] += mask.sum()
    return dynamic_k_experts_cpu(x, mask, w_in, w_up, w_out, b_in, b_out, activation)


def dynamic_k_experts_cuda(x, router_in, router_out, tau, top_k, expert_offset, w_in, w_up, w_out, b_in, b_out,
                           activation, counters, reference="max"):
    # Triton kernels: router + decode / grouped / dense fallback, chosen from host-known sizes.
    from d2dmoe_kernels.dispatch import dynamic_k_experts_triton

    return dynamic_k_experts_triton(x, router_in, router_out, tau, top_k, w_in, w_up, w_out, b_in, b_out,
                                    activation, counters, expert_offset=expert_offset, reference=reference)


def dynamic_k_experts_fake(x, router_in, router_out, tau, top_k, expert_offset, w_in, w_up, w_out, b_in, b_out,
                           activation, counters, reference="max"):
    return x.new_empty(x.shape[0], w_out.shape[2])


_lib.impl("dynamic_k_experts", dynamic_k_experts_host, "CPU")
_lib.impl("dynamic_k_experts", dynamic_k_experts_cuda, "CUDA")
torch.library.register_fake("d2dmoe::dynamic_k_experts", dynamic_k_experts_fake, lib=_lib)
