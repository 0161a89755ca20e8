"""Masked path on cuBLAS GEMMs for large token counts where Triton's tiles lose (small experts).

  up     one cuBLAS GEMM G = x [w_in; w_up; router_in]^T over the stacked weights (``layout.py``: the
         plugin keeps the three back to back), so the router's first layer rides along as a few %
         more columns instead of a GEMM of its own;
  router the router's tail on G's router columns (``router_tail``: ReLU, second layer, |.|, row max);
  select grid (ceil(T / BLOCK_T), ceil(E*e / BLOCK_C)): elementwise, H = act(G_in + b_in) * G_up
         where the token selected the neuron's expert (a gather of its score), exact zeros elsewhere;
         counters on the device;
  down   one cuBLAS GEMM out = H W_out + b_out (``expert_masked.down_gemm``).
It reads every weight and skips no FLOPs, so it is for token counts where independent selections
cover nearly every expert anyway: it costs the dense MLP plus the router's columns and its tail
(one launch more than dense: not for launch-bound small T). The result is the masked reference's.
Attempt 24 (docs/kernels.md): computing the router's tail inside the select kernel instead (one
launch fewer) made every program redo it and ran at 0.1-0.8x dense.
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.expert_masked import down_gemm
from d2dmoe_kernels.router_tail import router_tail, tile
from d2dmoe_kernels.triton_common import ACT_CODES, ANY_TOKEN_COUNT, activation, fp32_dots, neuron_selected


@triton.jit(**ANY_TOKEN_COUNT)
def _select_act_kernel(
    g_ptr, b_in_ptr, scores_ptr, ref_ptr, tau, h_ptr, counters_ptr,
    T, ES, E, UP_OFF, stride_g, stride_s,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_n = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    nmask = offs_n < E * ES
    xmask = tmask[:, None] & nmask[None, :]
    sel = neuron_selected(scores_ptr, ref_ptr, tau, offs_t, tmask, offs_n, nmask, ES, stride_s, counters_ptr, T,
                          (tl.program_id(0) == 0) & (tl.program_id(1) == 0))
    gp = g_ptr + offs_t.to(tl.int64)[:, None] * stride_g + offs_n[None, :]
    h = tl.load(gp, mask=sel, other=0.0).to(tl.float32)
    if HAS_BIAS:
        h += tl.load(b_in_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    h = activation(h, ACT)
    if GATED:
        h = h * tl.load(gp + UP_OFF, mask=sel, other=0.0).to(tl.float32)
    tl.store(h_ptr + offs_t.to(tl.int64)[:, None] * (E * ES) + offs_n[None, :],
             tl.where(sel, h, 0.0).to(h_ptr.dtype.element_ty), mask=xmask)


def gemm_masked_experts(x, stacked, router_out, tau, w_in, w_up, w_out, b_in, b_out, act, counters, cfg,
                        router_cfg, scores=None, ref=None, expert_offset=0, hidden=None):
    """x [T, d_in] -> [T, d_out]. ``stacked``: ``layout.stacked_up_view(w_in, w_up, router_in)``;
    local expert i is router expert ``expert_offset + i`` (selection against the max over all).
    ``scores``/``ref`` given (benchmarks): the router runs but these select, with factor ``tau``.
    ``hidden``: a [T, E*e] buffer for H (tests poison it: every element must be written)."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    W = router_out.shape[1]
    if fp32_dots(x) and x.dtype != torch.float32:  # interpreter: fp32 products, rounded as cuBLAS's output
        g = (x.float() @ stacked.float().t()).to(x.dtype)
    else:
        g = x @ stacked.t()
    r_scores, r_max = router_tail(g[:, g.shape[1] - W :], router_out, router_cfg)
    if scores is None:
        scores, ref = r_scores[:, expert_offset : expert_offset + E], r_max
    h = torch.empty((T, E * ES), device=x.device, dtype=x.dtype) if hidden is None else hidden
    block_t = tile(cfg["BLOCK_T"], T)
    block_c = tile(cfg["BLOCK_C"], E * ES)
    _select_act_kernel[(triton.cdiv(T, block_t), triton.cdiv(E * ES, block_c))](
        g, b_in if b_in is not None else g, scores, ref, float(tau), h, counters,
        T, ES, E, E * ES, g.stride(0), scores.stride(0),
        GATED=w_up is not None, HAS_BIAS=b_in is not None, ACT=ACT_CODES[act], BLOCK_T=block_t, BLOCK_C=block_c,
        num_warps=cfg["num_warps"],
    )
    return down_gemm(h, w_out, b_out, x)
