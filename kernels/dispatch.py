"""CUDA body of the expert op: picks the path from host-known facts only.

- every expert selected for sure (tau == 0, or top_k >= E): the dense GEMMs (cuBLAS), since no
  sparsity can win there;
- T <= fused max_tokens (decode of a few sequences): one fused kernel + a reduction;
- T <= decode max_tokens: the two-kernel decode path (streams only selected experts' weights);
- otherwise: the grouped path (FLOPs of selected token-expert pairs only).
No host synchronisation: selection, counts and tile schedules stay on the device.
"""

import torch

from d2dmoe_kernels.configs import kernel_config, path_config
from d2dmoe_kernels.expert_decode import decode_experts
from d2dmoe_kernels.expert_decode_fused import fused_decode_experts
from d2dmoe_kernels.expert_grouped import grouped_experts
from d2dmoe_kernels.reference import apply_activation, selection_rule

OWN_MAX_MAX_EXPERTS = 256  # the fused kernels take the row max themselves up to this many experts


def dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation):
    """All experts at once: the dense FFN on the expert weights viewed as [E*e, d]."""
    E, ES, D = w_in.shape
    h = torch.nn.functional.linear(x, w_in.reshape(E * ES, D), None if b_in is None else b_in.reshape(E * ES))
    h = apply_activation(h, activation)
    if w_up is not None:
        h = h * torch.nn.functional.linear(x, w_up.reshape(E * ES, D))
    out = h @ w_out.reshape(E * ES, D)
    return out if b_out is None else out + b_out


def dynamic_k_experts_triton(x, scores, tau, top_k, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg=None):
    T, D = x.shape
    E, ES, _ = w_in.shape
    if (top_k == 0 and tau == 0.0) or top_k >= E:
        counters[0] += T
        counters[1] += T * E
        return dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation)
    if cfg is None:
        cfg = kernel_config(torch.cuda.get_device_name(x.device) if x.is_cuda else None)
    x = x.contiguous()
    weights = (w_in, w_up, w_out, b_in, b_out, activation, counters)
    fused = path_config(cfg, "fused", D, ES)
    if T <= fused["max_tokens"] and top_k == 0 and E <= OWN_MAX_MAX_EXPERTS:
        return fused_decode_experts(x, scores, scores, float(tau), *weights, fused, own_max=True)
    ref, factor = selection_rule(scores, tau, top_k)
    if T <= fused["max_tokens"]:
        return fused_decode_experts(x, scores, ref, factor, *weights, fused)
    decode = path_config(cfg, "decode", D, ES)
    if T <= decode["max_tokens"]:
        return decode_experts(x, scores, ref, factor, *weights, decode)
    return grouped_experts(x, scores, ref, factor, *weights, path_config(cfg, "grouped", D, ES))
