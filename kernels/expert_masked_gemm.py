"""Masked path on cuBLAS GEMMs: the dense MLP's three launches, with the router and the selection inside.

  up     one cuBLAS GEMM G = x [w_in; w_up; router_in]^T over the stacked weights (``layout.py``: the
         plugin keeps the three back to back), so the router's first layer rides along as a few %
         more columns instead of a launch of its own;
  select grid (ceil(T / BLOCK_T), ceil(E*e / COLS)): a program reads its tokens' router hidden
         units from G, computes the router's tail (ReLU, second layer, |.|, row max over all router
         experts; the second layer is small) once, then walks its COLS neurons in BLOCK_C blocks, writing H = act(G_in + b_in) * G_up where the
         token selected the neuron's expert, exact zeros elsewhere; counters on the device;
  down   one cuBLAS GEMM out = H W_out + b_out (``expert_masked.down_gemm``).
It reads every weight and skips no FLOPs, so it is meant for token counts where independent
selections cover nearly every expert anyway and Triton's GEMM tiles lose to cuBLAS (small experts,
launch-bound shapes): it costs the dense MLP plus the router's columns. The result is the masked
reference's (zeros add nothing).

The selection of a [BLOCK_T, BLOCK_C] tile is a 0/1 product: which of the tile's experts each token
picked ([BLOCK_T, BLOCK_RE]) times the one-hot map of neurons to experts ([BLOCK_RE, BLOCK_C]), exact
for any expert size. ``scores``/``ref`` given (benchmarks, top-k off): the router still runs (its
result kept live by ``guard`` = inf) but selection follows the given scores.
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.expert_masked import down_gemm
from d2dmoe_kernels.router_tail import tile
from d2dmoe_kernels.triton_common import ACT_CODES, activation, fp32_dots, mma, router_tile


@triton.jit
def _select_act_kernel(
    g_ptr, w2_ptr, b_in_ptr, scores_ptr, ref_ptr, tau, guard, h_ptr, counters_ptr,
    T, ES, E, ER, W, E_OFF, UP_OFF, HID_OFF, COLS, stride_g, stride_s,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, OVERRIDE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RE: tl.constexpr, BLOCK_RW: tl.constexpr,
):
    # A program: BLOCK_T tokens x COLS neurons (a multiple of BLOCK_C), so the router's row max is
    # computed once per COLS columns (large T: COLS = every neuron; small T: narrow, more programs).
    tb = tl.program_id(0)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    hid_ptr = g_ptr + HID_OFF
    rmax = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for e0 in range(0, ER, BLOCK_RE):  # row max over every router expert (all ranks' under tensor parallelism)
        offs_e = e0 + tl.arange(0, BLOCK_RE)
        emask = offs_e < ER
        s = router_tile(hid_ptr, stride_g, w2_ptr, 0, w2_ptr, offs_t, tmask, offs_e, emask, W, UPCAST, BLOCK_T,
                        BLOCK_RE, BLOCK_RW, False, 16)
        rmax = tl.maximum(rmax, tl.max(tl.where(emask[None, :], s, 0.0), axis=1))
    if OVERRIDE:
        m = tl.load(ref_ptr + offs_t, mask=tmask, other=0.0).to(tl.float32)
    n_pairs = tl.zeros((), dtype=tl.int64)
    c_first = tl.program_id(1) * COLS
    for c0 in range(c_first, tl.minimum(c_first + COLS, E * ES), BLOCK_C):
        offs_n = c0 + tl.arange(0, BLOCK_C)
        nmask = offs_n < E * ES
        xmask = tmask[:, None] & nmask[None, :]
        gp = g_ptr + offs_t.to(tl.int64)[:, None] * stride_g + offs_n[None, :]
        g_in = tl.load(gp, mask=xmask, other=0.0)       # issued before the selection: no dependence
        if GATED:
            g_up = tl.load(gp + UP_OFF, mask=xmask, other=0.0)
        # The block's experts, from the same router tiles as the row max (bitwise the same scores,
        # so the arg-max expert always passes): which ones each token picked, spread to their
        # neurons by a 0/1 product with the one-hot neuron -> expert map.
        owner = E_OFF + offs_n // ES
        lo = E_OFF + c0 // ES
        hi = E_OFF + tl.minimum((c0 + BLOCK_C - 1) // ES, E - 1) + 1
        hits = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for e0 in range((lo // BLOCK_RE) * BLOCK_RE, hi, BLOCK_RE):
            offs_e = e0 + tl.arange(0, BLOCK_RE)
            emask = offs_e < ER
            s = router_tile(hid_ptr, stride_g, w2_ptr, 0, w2_ptr, offs_t, tmask, offs_e, emask, W, UPCAST, BLOCK_T,
                            BLOCK_RE, BLOCK_RW, False, 16)
            picked = ((s >= tau * rmax[:, None]) & emask[None, :]).to(tl.float16)
            onehot = (offs_e[:, None] == owner[None, :]).to(tl.float16)
            hits += mma(picked, onehot, UPCAST)
        sel = (hits > 0.5) & xmask
        if OVERRIDE:
            sc = tl.load(scores_ptr + offs_t[:, None] * stride_s + (offs_n // ES)[None, :], mask=xmask,
                         other=-1.0).to(tl.float32)
            sel = ((sc >= tau * m[:, None]) & xmask) | (sel & (rmax > guard)[:, None])
        firsts = (offs_n % ES == 0) & nmask  # each expert's pairs are counted where its first neuron lies
        n_pairs += tl.sum(tl.sum((sel & firsts[None, :]).to(tl.int64), axis=1), axis=0)
        h = g_in.to(tl.float32)
        if HAS_BIAS:
            h += tl.load(b_in_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        h = activation(h, ACT)
        if GATED:
            h = h * g_up.to(tl.float32)
        tl.store(h_ptr + offs_t.to(tl.int64)[:, None] * (E * ES) + offs_n[None, :],
                 tl.where(sel, h, 0.0).to(h_ptr.dtype.element_ty), mask=xmask)
    tl.atomic_add(counters_ptr + 1, n_pairs, sem="relaxed")
    if (tb == 0) & (tl.program_id(1) == 0):
        tl.atomic_add(counters_ptr, tl.zeros((), tl.int64) + T, sem="relaxed")


def gemm_masked_experts(x, stacked, router_out, tau, w_in, w_up, w_out, b_in, b_out, act, counters, cfg,
                        scores=None, ref=None, expert_offset=0, hidden=None):
    """x [T, d_in] -> [T, d_out]. ``stacked``: ``layout.stacked_up_view(w_in, w_up, router_in)``;
    local expert i is router expert ``expert_offset + i`` (selection against the max over all).
    ``hidden``: a [T, E*e] buffer for H (tests poison it: every element must be written)."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    ER, W = router_out.shape
    if fp32_dots(x) and x.dtype != torch.float32:  # interpreter: fp32 products, rounded as cuBLAS's output
        g = (x.float() @ stacked.float().t()).to(x.dtype)
    else:
        g = x @ stacked.t()
    h = torch.empty((T, E * ES), device=x.device, dtype=x.dtype) if hidden is None else hidden
    block_t = tile(cfg["BLOCK_T"], T)
    block_c = tile(cfg["BLOCK_C"], E * ES)
    cols = triton.cdiv(min(cfg.get("COLS", block_c), E * ES), block_c) * block_c  # neurons per program
    override = scores is not None
    _select_act_kernel[(triton.cdiv(T, block_t), triton.cdiv(E * ES, cols))](
        g, router_out, b_in if b_in is not None else g, scores if override else g, ref if override else g,
        float(tau), float("inf"), h, counters,
        T, ES, E, ER, W, expert_offset, E * ES, E * ES * (2 if w_up is not None else 1), cols, g.stride(0),
        scores.stride(0) if override else 0,
        GATED=w_up is not None, HAS_BIAS=b_in is not None, ACT=ACT_CODES[act], UPCAST=fp32_dots(x),
        OVERRIDE=override, BLOCK_T=block_t, BLOCK_C=block_c,
        BLOCK_RE=tile(cfg["ROUTER_BLOCK_E"], ER), BLOCK_RW=tile(cfg["ROUTER_BLOCK_W"], W),
        num_warps=cfg["num_warps"],
    )
    return down_gemm(h, w_out, b_out, x)
