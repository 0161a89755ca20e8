"""Decode path (few tokens, memory-bound): stream only the weights of experts some token selected.

Two kernels and an optional reduction:
  up   grid (E, ceil(e / BLOCK_E)): an expert's program exits at once if no token selected it;
       otherwise it reads its rows of w_in (and w_up) once for all T tokens and writes
       h = act(x w_in^T + b_in) * (x w_up^T) to H [T, E*e] (fp32).
  down grid (ceil(d_out / BLOCK_N), SPLIT): each program owns an output column block and a 1/SPLIT
       share of the experts; it skips experts no token selected and accumulates, in fp32 registers,
       only selected (token, expert) pairs. With SPLIT == 1 it writes the output (+ b_out) directly;
       otherwise partial sums go to P [SPLIT, T, d_out] and ``reduce_partials`` adds them in a fixed
       order (deterministic, no atomics).
Grids depend only on host-known sizes; selection is read on the device.
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.triton_common import ACT_CODES, count_selected, expert_hidden, fp32_dots, mma, selected


@triton.jit
def _decode_up_kernel(
    x_ptr, scores_ptr, rowmax_ptr, tau, w_in_ptr, w_up_ptr, b_in_ptr, h_ptr, counters_ptr,
    T, D, ES, E,
    stride_x, stride_s,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
):
    e = tl.program_id(0)
    c = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    sel = selected(scores_ptr, rowmax_ptr, tau, offs_t, tmask, e, stride_s)
    if count_selected(sel, counters_ptr, e, c, T) == 0:
        return
    offs_j = c * BLOCK_E + tl.arange(0, BLOCK_E)
    jmask = offs_j < ES
    h = expert_hidden(x_ptr, offs_t, tmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, e, offs_j, jmask, D, ES,
                      GATED, HAS_BIAS, ACT, UPCAST, BLOCK_T, BLOCK_E, BLOCK_K)
    tl.store(h_ptr + offs_t[:, None] * (E * ES) + (e * ES + offs_j)[None, :], h, mask=tmask[:, None] & jmask[None, :])


@triton.jit
def _decode_down_kernel(
    h_ptr, scores_ptr, rowmax_ptr, tau, w_out_ptr, b_out_ptr, out_ptr, part_ptr,
    T, DO, ES, E,
    stride_s, stride_o,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    n = tl.program_id(0)
    s = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_n = n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < DO
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for e in range(s, E, SPLIT):
        sel = selected(scores_ptr, rowmax_ptr, tau, offs_t, tmask, e, stride_s)
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            for j0 in range(0, ES, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                jmask = offs_j < ES
                h = tl.load(h_ptr + offs_t[:, None] * (E * ES) + (e * ES + offs_j)[None, :],
                            mask=sel[:, None] & jmask[None, :], other=0.0)
                w = tl.load(w_out_ptr + (e * ES + offs_j).to(tl.int64)[:, None] * DO + offs_n[None, :],
                            mask=jmask[:, None] & nmask[None, :], other=0.0)
                acc += mma(h if UPCAST else h.to(w.dtype), w, UPCAST)
    omask = tmask[:, None] & nmask[None, :]
    if SPLIT == 1:
        if HAS_BIAS:
            acc += tl.load(b_out_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_t[:, None] * stride_o + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        tl.store(part_ptr + (s * T + offs_t)[:, None] * DO + offs_n[None, :], acc, mask=omask)


@triton.jit
def _reduce_partials_kernel(
    part_ptr, b_out_ptr, out_ptr, T, DO, stride_o,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < T * DO
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):  # fixed order: deterministic
        acc += tl.load(part_ptr + s * T * DO + offs, mask=mask, other=0.0)
    col = offs % DO
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + col, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // DO) * stride_o + col, acc.to(out_ptr.dtype.element_ty), mask=mask)


def decode_experts(x, scores, rowmax, tau, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, out=None):
    """Launch the decode path. x [T, d_in] (T <= cfg['max_tokens']), scores [T, E], rowmax [T] fp32
    -> [T, d_out] (d_out = w_out.shape[2])."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    DO = w_out.shape[2]
    block_t = max(16, triton.next_power_of_2(T))
    block_e = min(cfg["BLOCK_E"], triton.next_power_of_2(ES))
    block_j = min(cfg["BLOCK_J"], triton.next_power_of_2(ES))
    block_n, split = cfg["BLOCK_N"], cfg["SPLIT"]
    if out is None:
        out = x.new_empty(T, DO)
    h = torch.empty((T, E * ES), device=x.device, dtype=torch.float32)
    gated, has_b_in, has_b_out = w_up is not None, b_in is not None, b_out is not None
    _decode_up_kernel[(E, triton.cdiv(ES, block_e))](
        x, scores, rowmax, tau, w_in, w_up if gated else w_in, b_in if has_b_in else w_in, h, counters,
        T, D, ES, E, x.stride(0), scores.stride(0),
        GATED=gated, HAS_BIAS=has_b_in, ACT=ACT_CODES[activation], UPCAST=fp32_dots(x),
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    part = torch.empty((split, T, DO), device=x.device, dtype=torch.float32) if split > 1 else h
    _decode_down_kernel[(triton.cdiv(DO, block_n), split)](
        h, scores, rowmax, tau, w_out, b_out if has_b_out else w_out, out, part,
        T, DO, ES, E, scores.stride(0), out.stride(0),
        HAS_BIAS=has_b_out, SPLIT=split, UPCAST=fp32_dots(x),
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_J=block_j, num_warps=cfg["num_warps"],
    )
    if split > 1:
        block = 1024
        _reduce_partials_kernel[(triton.cdiv(T * DO, block),)](
            part, b_out if has_b_out else part, out, T, DO, out.stride(0),
            HAS_BIAS=has_b_out, SPLIT=split, BLOCK=block,
        )
    return out
