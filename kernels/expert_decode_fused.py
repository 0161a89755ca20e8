"""Decode path for a handful of tokens (T <= 4 by default): one fused kernel + one reduction.

  fused  grid (E, ceil(e / BLOCK_J)): a program owns a slice of one expert's neurons. It finds the
         per-token maximum router score itself (T x E scores, a few KB), exits at once if no token
         selected its expert, else computes h = act(x w_in^T + b_in) * (x w_up^T) for the slice and
         immediately multiplies by the slice's rows of w_out, writing a partial output
         P[e, slice] = h w_out[slice] (fp32, [T, d_out]). Every selected weight byte is read once,
         in contiguous rows, by one of E * e / BLOCK_J programs. With ``PREFETCH`` (config) a selected
         program first asks L2 for its slice's rows (sm_90 bulk prefetch), so its two streamed loops
         are not bound by the few tiles its pipeline keeps in flight; with ``TMA`` the tiles come
         through tensor descriptors (the copy engine) instead of per-thread loads.
  reduce grid (ceil(d_out / BLOCK_N), T): out[t] = sum of the selected slices' partials in a fixed
         order (deterministic, no atomics) + b_out.
Three launches fewer than the two-kernel path (no separate row-max, up and down kernels).
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.configs import for_element_size
from d2dmoe_kernels.router_tail import tile
from d2dmoe_kernels.triton_common import (ACT_CODES, await_producer, count_selected, expert_hidden, fp32_dots, mma,
                                          pdl_launch, prefetch_l2, prefetch_ok, router_select, rows_descriptor,
                                          selected, tma_ok, use_pdl)


@triton.jit
def _fused_decode_kernel(
    x_ptr, scores_ptr, ref_ptr, tau, w_in_ptr, w_up_ptr, w_out_ptr, b_in_ptr, part_ptr, counters_ptr,
    hid_ptr, w1_ptr, w2_ptr, rscores_ptr, rref_ptr, guard,
    T, D, DO, ES, E, ER, W, E_OFF,
    stride_x, stride_s, stride_h,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
    OWN_MAX: tl.constexpr, ROUTER: tl.constexpr, FULL_ROUTER: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_EALL: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_RE: tl.constexpr, BLOCK_RW: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr,
    THREADS: tl.constexpr, TMA: tl.constexpr,
):
    await_producer(PDL)
    e = tl.program_id(0)
    c = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    if ROUTER > 0:  # the router's tail in the program; scores and row max kept for the reduction
        s_e, rmax = router_select(hid_ptr, stride_h, w1_ptr, D, w2_ptr, offs_t, tmask, e + E_OFF, ER, W,
                                  UPCAST, BLOCK_T, BLOCK_RE, BLOCK_RW, FULL_ROUTER, BLOCK_K)
        if c == 0:
            tl.store(rscores_ptr + offs_t * E + e, s_e, mask=tmask)
            if e == 0:
                tl.store(rref_ptr + offs_t, rmax, mask=tmask)
        if ROUTER == 1:
            sel = (s_e >= tau * rmax) & tmask
        else:  # benchmarks: router paid, selection from the given scores (guard = inf keeps it live)
            sel = (selected(scores_ptr, ref_ptr, tau, offs_t, tmask, e, stride_s) | (s_e > guard)) & tmask
    elif OWN_MAX:  # dynamic-k: reference value = max_e R_te, computed here (saves a launch)
        offs_all = tl.arange(0, BLOCK_EALL)
        s_all = tl.load(scores_ptr + offs_t[:, None] * stride_s + offs_all[None, :],
                        mask=tmask[:, None] & (offs_all < E)[None, :], other=0.0).to(tl.float32)
        rmax = tl.max(s_all, axis=1)
        s = tl.load(scores_ptr + offs_t * stride_s + e, mask=tmask, other=-1.0).to(tl.float32)
        sel = (s >= tau * rmax) & tmask
    else:
        sel = selected(scores_ptr, ref_ptr, tau, offs_t, tmask, e, stride_s)
    if count_selected(sel, counters_ptr, e, c, T) == 0:
        return
    first_row = e * ES + c * BLOCK_J  # the slice's first weight row (TMA: the host has ES % BLOCK_J == 0)
    if PREFETCH > 0:  # the slice's weights requested at once (bit 2: w_in / w_up, bit 1: w_out)
        row0 = first_row.to(tl.int64)
        n_rows = tl.minimum(ES - c * BLOCK_J, BLOCK_J)
        if PREFETCH & 2:
            prefetch_l2(w_in_ptr + row0 * D, n_rows * D, THREADS)
            if GATED:
                prefetch_l2(w_up_ptr + row0 * D, n_rows * D, THREADS)
        if PREFETCH & 1:
            prefetch_l2(w_out_ptr + row0 * DO, n_rows * DO, THREADS)
    offs_j = c * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = offs_j < ES
    h = expert_hidden(x_ptr, offs_t, tmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, e, offs_j, jmask, D, ES,
                      GATED, HAS_BIAS, ACT, UPCAST, BLOCK_T, BLOCK_J, BLOCK_K, TMA, first_row)
    h = tl.where(sel[:, None] & jmask[None, :], h, 0.0)   # unselected tokens contribute nothing
    if not UPCAST:
        h = h.to(x_ptr.dtype.element_ty)  # the weights' dtype (the op takes x in it)
    slot = e * tl.num_programs(1) + c
    for n0 in range(0, DO, BLOCK_N):  # the output width (w_out's rows), d_out
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < DO
        if TMA:
            w = w_out_ptr.load([first_row, n0])
        else:
            w = tl.load(w_out_ptr + (e * ES + offs_j).to(tl.int64)[:, None] * DO + offs_n[None, :],
                        mask=jmask[:, None] & nmask[None, :], other=0.0)
        p = mma(h, w, UPCAST)
        tl.store(part_ptr + (slot * T + offs_t)[:, None] * DO + offs_n[None, :], p,
                 mask=tmask[:, None] & nmask[None, :])


@triton.jit
def _fused_reduce_kernel(
    part_ptr, scores_ptr, ref_ptr, tau, b_out_ptr, out_ptr,
    T, DO, E, NC, stride_s, stride_o,
    HAS_BIAS: tl.constexpr, OWN_MAX: tl.constexpr,
    BLOCK_EALL: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    await_producer(PDL)
    # One program per (column block, token): all of the token's selected slices are loaded as one
    # [BLOCK_S, BLOCK_N] tile per step (no data-dependent branch, so the loads overlap).
    t = tl.program_id(1)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < DO
    if OWN_MAX:
        offs_all = tl.arange(0, BLOCK_EALL)
        s_all = tl.load(scores_ptr + t * stride_s + offs_all, mask=offs_all < E, other=0.0).to(tl.float32)
        thr = tau * tl.max(s_all, axis=0)
    else:
        thr = tau * tl.load(ref_ptr + t).to(tl.float32)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s0 in range(0, E * NC, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        smask = slots < E * NC
        sc = tl.load(scores_ptr + t * stride_s + slots // NC, mask=smask, other=-1.0).to(tl.float32)
        sel = (sc >= thr) & smask
        p = tl.load(part_ptr + (slots.to(tl.int64) * T + t)[:, None] * DO + offs_n[None, :],
                    mask=sel[:, None] & nmask[None, :], other=0.0)
        acc += tl.sum(p, axis=0)
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


def fused_decode_experts(x, scores, ref, tau, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, out=None,
                         own_max=False, hid=None, router_out=None, expert_offset=0, router_in=None):
    """x [T, d_in] -> [T, d_out] (d_out = w_out.shape[2]) with T small. ``own_max``: ref is ignored
    and each program takes the row max itself.
    ``router_out`` given: the programs compute the router's tail themselves from ``hid`` (router
    first layer, before ReLU), or with ``hid`` None the whole router from ``router_in`` (two launches
    fewer); selection then follows the router unless ``scores`` is given too (benchmarks: router
    paid, controlled routing)."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    DO = w_out.shape[2]
    if x.is_cuda:  # fp32 weights: tiles of the bf16 config's bytes (shared memory; the interpreter has no limit)
        cfg = for_element_size(cfg, w_in.element_size())
    router = 0 if router_out is None else (1 if scores is None else 2)
    full = router > 0 and hid is None
    rscores = rref = None
    if router:
        rscores = torch.empty((T, E), device=x.device, dtype=torch.float32)
        rref = torch.empty((T,), device=x.device, dtype=torch.float32)
        if router == 1:
            scores, ref, own_max = rscores, rref, False
    ER, W = (router_out.shape[0], router_out.shape[1]) if router else (E, 16)
    block_t = max(16, triton.next_power_of_2(T))
    block_eall = triton.next_power_of_2(E)
    block_j = min(cfg["BLOCK_J"], triton.next_power_of_2(ES))
    nc = triton.cdiv(ES, block_j)
    if out is None:
        out = x.new_empty(T, DO)
    part = torch.empty((E * nc, T, DO), device=x.device, dtype=torch.float32)
    gated, has_b_in, has_b_out = w_up is not None, b_in is not None, b_out is not None
    pdl = use_pdl(cfg, x)
    tma = ES % block_j == 0 and tma_ok(cfg.get("TMA", 0), x, w_in, w_up, w_out)
    prefetch = 0 if tma else prefetch_ok(cfg.get("PREFETCH", 0), x, w_in, w_up, w_out)
    wi, wu, wo = w_in, w_up if gated else w_in, w_out
    if tma:  # the slices' tiles through the copy engine (PREFETCH off: it needs pointers)
        wi = rows_descriptor(w_in, block_j, cfg["BLOCK_K"])
        wu = rows_descriptor(w_up, block_j, cfg["BLOCK_K"]) if gated else wi
        wo = rows_descriptor(w_out, block_j, cfg["BLOCK_N"])
    _fused_decode_kernel[(E, nc)](
        x, scores, ref, tau, wi, wu, wo, b_in if has_b_in else w_in, part, counters,
        x if full or not router else hid, router_in if full else w_in, router_out if router else w_in,
        rscores if router else part,
        rref if router else part, float("inf"),
        T, D, DO, ES, E, ER, W, expert_offset, x.stride(0), scores.stride(0), x.stride(0) if full or not router else hid.stride(0),
        GATED=gated, HAS_BIAS=has_b_in, ACT=ACT_CODES[activation], UPCAST=fp32_dots(x), OWN_MAX=own_max,
        ROUTER=router, FULL_ROUTER=full, BLOCK_T=block_t, BLOCK_EALL=block_eall, BLOCK_J=block_j, BLOCK_K=cfg["BLOCK_K"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_RE=tile(cfg.get("ROUTER_BLOCK_E", 64), ER),
        BLOCK_RW=tile(cfg.get("ROUTER_BLOCK_W", 128), W), PDL=pdl, PREFETCH=prefetch, THREADS=32 * cfg["num_warps"],
        TMA=tma,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(pdl),
    )
    _fused_reduce_kernel[(triton.cdiv(DO, cfg["BLOCK_N_REDUCE"]), T)](
        part, scores, ref, tau, b_out if has_b_out else part, out,
        T, DO, E, nc, scores.stride(0), out.stride(0),
        HAS_BIAS=has_b_out, OWN_MAX=own_max, BLOCK_EALL=block_eall,
        BLOCK_S=min(cfg.get("REDUCE_BLOCK_S", 64), triton.next_power_of_2(E * nc)),  # slots per step
        BLOCK_N=cfg["BLOCK_N_REDUCE"], PDL=pdl, **pdl_launch(pdl),
    )
    return out
