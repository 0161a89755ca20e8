"""Decode path for a handful of tokens with the work spread evenly over the SMs: one kernel + one reduction.

The fused decode kernel (``expert_decode_fused.py``) launches one program per (expert, neuron
slice) and lets the unselected ones exit, so at 30% of experts only ~30% of its programs stream
weights and most SMs idle (H100, Gemma-2B FFN, T = 1: ~2.1 TB/s of 3.35). Here the grid is fixed
by the device (``programs_per_sm`` x SMs), and the work is the selected experts' neurons laid end to
end:

  balanced  every program finds the selected experts itself (T x E scores: any token selects e),
            numbers them in expert order (prefix sum), and takes one contiguous range of the
            n_sel * e selected neurons (range p = [p N / P, (p+1) N / P)), in chunks of BLOCK_J
            neurons (a chunk spans at most two experts: BLOCK_J <= e). For each chunk it computes
            h = act(x w_in^T + b_in) * (x w_up^T) for the tokens that selected the chunk's
            experts (zeros for the others) and adds h w_out[chunk] into its own fp32 partial
            output P[p] ([T, d_out], in global memory, no atomics). Every program reads within one
            row of the same number of weight bytes, whatever the selection.
  reduce    grid (ceil(d_out / BLOCK_N), T): out[t] = sum over p of P[p, t] in program order
            (deterministic) + b_out.
Selection comes from given scores (router GEMM + tail, or the torch router): the row max given, or
taken by every program (``own_max``). Grids depend on the device and T only; counts stay on the device.
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.triton_common import ACT_CODES, add_down_partial, expert_hidden, fp32_dots, num_programs


@triton.jit
def _balanced_decode_kernel(
    x_ptr, scores_ptr, ref_ptr, tau, w_in_ptr, w_up_ptr, w_out_ptr, b_in_ptr, part_ptr, counters_ptr,
    T, D, DO, ES, E, stride_x, stride_s,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, OWN_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_EALL: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    p = tl.program_id(0)
    P = tl.num_programs(0)
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_e = tl.arange(0, BLOCK_EALL)
    emask = offs_e < E
    # which experts any token selected, and each token's threshold tau * max_e R_te
    any_e = tl.zeros((BLOCK_EALL,), dtype=tl.int32)
    thr = tl.zeros((BLOCK_T,), dtype=tl.float32)
    pairs = tl.zeros((), dtype=tl.int32)
    for t in range(0, T):
        s = tl.load(scores_ptr + t * stride_s + offs_e, mask=emask, other=-1.0).to(tl.float32)
        if OWN_MAX:
            th = tau * tl.max(tl.where(emask, s, 0.0), axis=0)
        else:
            th = tau * tl.load(ref_ptr + t).to(tl.float32)
        se = ((s >= th) & emask).to(tl.int32)
        any_e = tl.maximum(any_e, se)
        pairs += tl.sum(se, axis=0)
        thr = tl.where(offs_t == t, th, thr)
    if p == 0:  # compute accounting: pairs executed, tokens
        tl.atomic_add(counters_ptr + 1, pairs.to(tl.int64), sem="relaxed")
        tl.atomic_add(counters_ptr, tl.zeros((), tl.int64) + T, sem="relaxed")
    incl = tl.cumsum(any_e, axis=0)          # selected experts among 0..e; equals n_sel past the last one
    n = tl.sum(any_e, axis=0) * ES           # selected neurons, laid end to end in expert order
    lo = (p * n) // P
    hi = ((p + 1) * n) // P
    part = part_ptr + p.to(tl.int64) * T * DO
    if lo == hi:  # nothing to do: the partial must still read as zeros
        for n0 in range(0, DO, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            tl.store(part + offs_t[:, None] * DO + offs_n[None, :], tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32),
                     mask=tmask[:, None] & (offs_n < DO)[None, :])
    for g0 in range(lo, hi, BLOCK_J):
        offs_g = g0 + tl.arange(0, BLOCK_J)
        gmask = offs_g < hi
        k0 = g0 // ES                        # rank of the chunk's first expert; the last is k0 or k0 + 1
        k1 = (tl.minimum(g0 + BLOCK_J, hi) - 1) // ES
        e_first = tl.sum((incl <= k0).to(tl.int32), axis=0)   # expert of rank k: #experts with incl <= k
        e_last = tl.sum((incl <= k1).to(tl.int32), axis=0)
        e_n = tl.where(offs_g // ES == k0, e_first, e_last)
        rows = e_n * ES + offs_g % ES        # the neurons' rows in [E * e]
        h = expert_hidden(x_ptr, offs_t, tmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, 0, rows, gmask, D, ES,
                          GATED, HAS_BIAS, ACT, UPCAST, BLOCK_T, BLOCK_J, BLOCK_K)
        s_tn = tl.load(scores_ptr + offs_t[:, None] * stride_s + e_n[None, :], mask=tmask[:, None] & gmask[None, :],
                       other=-1.0).to(tl.float32)
        sel = (s_tn >= thr[:, None]) & tmask[:, None] & gmask[None, :]
        h = tl.where(sel, h, 0.0)            # tokens that did not select the neuron's expert add nothing
        if not UPCAST:
            h = h.to(w_out_ptr.dtype.element_ty)
        add_down_partial(h, w_out_ptr, rows, gmask, DO, part, offs_t, tmask, g0 > lo, UPCAST, BLOCK_N)


@triton.jit
def _balanced_reduce_kernel(
    part_ptr, b_out_ptr, out_ptr, T, DO, P, stride_o,
    HAS_BIAS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
):
    t = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < DO
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s0 in range(0, P, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        p = tl.load(part_ptr + (slots.to(tl.int64) * T + t)[:, None] * DO + offs_n[None, :],
                    mask=(slots < P)[:, None] & nmask[None, :], other=0.0)
        acc += tl.sum(p, axis=0)
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


def balanced_decode_experts(x, scores, ref, tau, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, out=None,
                            own_max=False):
    """x [T, d_in] -> [T, d_out] (d_out = w_out.shape[2]) with T small; expert e runs for token t iff
    scores[t, e] >= tau * ref[t] (``own_max``: ref ignored, each program takes the row max)."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    DO = w_out.shape[2]
    block_j = min(cfg["BLOCK_J"], 1 << (ES.bit_length() - 1))  # a power of two <= e: a chunk spans <= 2 experts
    nprog = num_programs(x, cfg["programs_per_sm"])
    if out is None:
        out = x.new_empty(T, DO)
    part = torch.empty((nprog, T, DO), device=x.device, dtype=torch.float32)
    gated, has_b_in, has_b_out = w_up is not None, b_in is not None, b_out is not None
    _balanced_decode_kernel[(nprog,)](
        x, scores, scores if own_max else ref, tau, w_in, w_up if gated else w_in, w_out,
        b_in if has_b_in else w_in, part, counters, T, D, DO, ES, E, x.stride(0), scores.stride(0),
        GATED=gated, HAS_BIAS=has_b_in, ACT=ACT_CODES[activation], UPCAST=fp32_dots(x), OWN_MAX=own_max,
        BLOCK_T=max(16, triton.next_power_of_2(T)), BLOCK_EALL=triton.next_power_of_2(E), BLOCK_J=block_j,
        BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _balanced_reduce_kernel[(triton.cdiv(DO, cfg["BLOCK_N_REDUCE"]), T)](
        part, b_out if has_b_out else part, out, T, DO, nprog, out.stride(0),
        HAS_BIAS=has_b_out, BLOCK_S=min(64, triton.next_power_of_2(nprog)), BLOCK_N=cfg["BLOCK_N_REDUCE"],
    )
    return out
