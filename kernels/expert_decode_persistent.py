"""Decode path for a token or a few in ONE launch: router, selection, experts and reduction.

At decode sizes a layer's time is launches and pipeline ramps, not bytes (docs/kernels.md, attempts
9, 17, 33: the dependent launches -- router first layer, router tail, fused experts, reduction --
cost ~10 us at Gemma-2B T = 1 on top of the ~17 us the selected bytes need). Here one program per SM
runs the whole layer, the phases separated by grid barriers (``triton_common.grid_barrier``):

  A  router first layer: hidden-unit blocks spread over the programs -> hid [T, w]     | barrier
  B  every program computes all E scores itself (|relu(hid) W2^T|, rounded to the weights' dtype,
     the row max), so all agree on the selection without another barrier; the selected experts'
     neurons are laid end to end in expert order (prefix sum) and cut into BLOCK_R-row slices
     (a slice may span small experts), slice s to program s mod P. Per slice one pipelined up stream
     (h = act(x w_in^T + b_in) * x w_up^T) and one down stream (h w_out) into the program's own fp32
     partial [T, d_out]                                                                  | barrier
  C  column blocks spread over the programs: out = sum of the partials in program order (fixed,
     deterministic, no atomics on outputs) + b_out.

Measured on the H200 (attempt 38): correct everywhere, **off in every device file** -- it beats the
launch pipeline only at 10% of experts (Gemma-2B T=1 20.6 vs 24.2 us with 16-row slices) and loses at
30% (31.7 vs 28.4 us with 64-row slices; GPT-2: parity, 11.6 vs 11.7 at 16 rows). Spreading the rows
evenly (each program ~n / P rows) measured slower still (33.6 us): a slice costs its pipelined steps,
not its bytes.

The grid is one program per SM so all are resident at once (a barrier needs that; on a GPU whose SMs
other processes' kernels may hold for long -- MPS, shared partitions -- set ``"phased": true``). Under the
interpreter (programs run one after another), or where no barrier buffer exists yet while a CUDA
graph is being captured, the same kernel runs as one launch per phase (``PHASE`` 1, 2, 3): the same
code, the launch boundaries as the barriers. Selection comes from the kernel's own router, or from
given scores (``scores``; with the router too: a benchmark pays the router, controls the routing).
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.configs import for_element_size
from d2dmoe_kernels.router_tail import tile
from d2dmoe_kernels.triton_common import (ACT_CODES, INTERPRET, add_down_partial, await_producer, expert_hidden,
                                          fp32_dots, grid_barrier, num_programs, pdl_launch, router_hidden_block,
                                          router_tile, use_pdl)

# PHASE values (constexpr globals: the kernel reads them)
ALL_PHASES, HIDDEN, EXPERTS, REDUCE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)


@triton.jit
def _persistent_decode_kernel(
    x_ptr, w1_ptr, w2_ptr, scores_ptr, ref_ptr, guard, tau,
    w_in_ptr, w_up_ptr, w_out_ptr, b_in_ptr, b_out_ptr, out_ptr,
    hid_ptr, sel_ptr, part_ptr, n_ptr, bar_ptr, counters_ptr,
    T, D, DO, ES, E, W, stride_x, stride_s, stride_o,
    GATED: tl.constexpr, HAS_B_IN: tl.constexpr, HAS_B_OUT: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
    ROUTER: tl.constexpr, HAS_REF: tl.constexpr, PHASE: tl.constexpr, PDL: tl.constexpr, ONE_TOKEN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_EALL: tl.constexpr, BLOCK_HW: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_RW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_NR: tl.constexpr, BLOCK_S: tl.constexpr,
):
    await_producer(PDL)
    p = tl.program_id(0)
    P = tl.num_programs(0)
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < T

    if PHASE == ALL_PHASES:  # barrier 2's counter, left at P by the last call, is reset before barrier 1
        if p == 0:           # completes, so no program reaches barrier 2 before it
            tl.atomic_xchg(bar_ptr + 1, 0, sem="relaxed")

    # -- A: the router's first layer, hidden-unit blocks over the programs ---------------------------
    if ROUTER > 0:
        if PHASE == ALL_PHASES or PHASE == HIDDEN:
            for w0 in range(p * BLOCK_HW, W, P * BLOCK_HW):
                offs_w = w0 + tl.arange(0, BLOCK_HW)
                wmask = offs_w < W
                hb = router_hidden_block(x_ptr, stride_x, w1_ptr, D, offs_t, tmask, offs_w, wmask,
                                         UPCAST, BLOCK_T, BLOCK_HW, BLOCK_HK)
                tl.store(hid_ptr + offs_t[:, None] * W + offs_w[None, :], hb, mask=tmask[:, None] & wmask[None, :])
    if PHASE == ALL_PHASES:
        grid_barrier(bar_ptr, P)

    # -- B: selection (every program), then the program's slices of the selected neurons -------------
    if PHASE == ALL_PHASES or PHASE == EXPERTS:
        offs_e = tl.arange(0, BLOCK_EALL)
        emask = offs_e < E
        te_mask = tmask[:, None] & emask[None, :]
        if ROUTER > 0:
            s_r = router_tile(hid_ptr, W, w1_ptr, D, w2_ptr, offs_t, tmask, offs_e, emask, W,
                              UPCAST, BLOCK_T, BLOCK_EALL, BLOCK_RW, False, 16)
        if ROUTER == 1:
            s = s_r
        else:
            s = tl.load(scores_ptr + offs_t[:, None] * stride_s + offs_e[None, :], mask=te_mask,
                        other=-1.0).to(tl.float32)
        if HAS_REF:
            thr = tau * tl.load(ref_ptr + offs_t, mask=tmask, other=0.0).to(tl.float32)
        else:  # dynamic-k: tau * max_e R_te
            thr = tau * tl.max(tl.where(te_mask, s, 0.0), axis=1)
        sel = (s >= thr[:, None]) & te_mask
        if ROUTER == 2:  # benchmarks: router paid, selection given (guard = inf keeps the router live)
            sel = sel | ((s_r > guard) & te_mask)
        sel_i = sel.to(tl.int32)
        any_e = tl.max(sel_i, axis=0)              # [BLOCK_EALL]: some token selected expert e
        incl = tl.cumsum(any_e, axis=0)            # selected experts among 0..e
        n = tl.sum(any_e, axis=0) * ES             # selected neurons, end to end in expert order
        my_sel = sel_ptr + p.to(tl.int64) * T * E  # this program's copy of the [T, E] selection (T > 1)
        if not ONE_TOKEN:
            tl.store(my_sel + offs_t[:, None] * E + offs_e[None, :], sel.to(tl.int8), mask=te_mask)
        if p == 0:
            if PHASE != ALL_PHASES:
                tl.store(n_ptr, n)
            tl.atomic_add(counters_ptr + 1, tl.sum(tl.sum(sel_i, axis=1), axis=0).to(tl.int64), sem="relaxed")
            tl.atomic_add(counters_ptr, tl.zeros((), tl.int64) + T, sem="relaxed")
        if not ONE_TOKEN:
            tl.debug_barrier()                     # the selection copy is read back by other threads
        part = part_ptr + p.to(tl.int64) * T * DO
        for r0 in range(p * BLOCK_R, n, P * BLOCK_R):  # slice s of the selected rows to program s mod P
            offs_r = r0 + tl.arange(0, BLOCK_R)
            rmask = offs_r < n
            rank = offs_r // ES                    # which selected expert, in expert order
            e_r = tl.sum((incl[None, :] <= rank[:, None]).to(tl.int32), axis=1)
            rows = e_r * ES + offs_r % ES          # the neurons' rows in [E * e]
            h = expert_hidden(x_ptr, offs_t, tmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, 0, rows, rmask, D, ES,
                              GATED, HAS_B_IN, ACT, UPCAST, BLOCK_T, BLOCK_R, BLOCK_K)
            if ONE_TOKEN:                          # the token selected every expert in the list
                h = tl.where(rmask[None, :], h, 0.0)
            else:                                  # tokens that did not select the neuron's expert add nothing
                run = tl.load(my_sel + offs_t[:, None] * E + e_r[None, :], mask=tmask[:, None] & rmask[None, :],
                              other=0)
                h = tl.where(run != 0, h, 0.0)
            if not UPCAST:
                h = h.to(w_out_ptr.dtype.element_ty)
            add_down_partial(h, w_out_ptr, rows, rmask, DO, part, offs_t, tmask, r0 > p * BLOCK_R, UPCAST, BLOCK_N)
    if PHASE == ALL_PHASES:
        grid_barrier(bar_ptr + 1, P)
        if p == 0:  # every program has left barrier 1 (all arrived at barrier 2): reset it for the next call
            tl.atomic_xchg(bar_ptr, 0, sem="relaxed")

    # -- C: out = the partials summed in program order + b_out, column blocks over the programs -------
    if PHASE == ALL_PHASES or PHASE == REDUCE:
        if PHASE == REDUCE:  # a launch of its own: the count from phase B's launch
            n = tl.load(n_ptr, cache_modifier=".cg")
        for c0 in range(p * BLOCK_NR, DO, P * BLOCK_NR):
            offs_n = c0 + tl.arange(0, BLOCK_NR)
            nmask = offs_n < DO
            for t in range(0, T):
                acc = tl.zeros((BLOCK_NR,), dtype=tl.float32)
                for q0 in range(0, P, BLOCK_S):
                    q = q0 + tl.arange(0, BLOCK_S)
                    has_rows = (q < P) & (q * BLOCK_R < n)  # programs with no slice wrote nothing
                    v = tl.load(part_ptr + (q.to(tl.int64) * T + t)[:, None] * DO + offs_n[None, :],
                                mask=has_rows[:, None] & nmask[None, :], other=0.0, cache_modifier=".cg")
                    acc += tl.sum(v, axis=0)
                if HAS_B_OUT:
                    acc += tl.load(b_out_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)
                tl.store(out_ptr + t * stride_o + offs_n, acc.to(out_ptr.dtype.element_ty), mask=nmask)


_BARRIERS: dict[int, torch.Tensor] = {}


def barrier_buffer(x: torch.Tensor) -> torch.Tensor | None:
    """The device's grid-barrier counters (int32 [2], zeroed once; each call resets what it uses).
    None while a CUDA graph is being captured before any eager call made it: memory allocated during
    capture belongs to that graph, so the caller launches the phases separately instead."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    buf = _BARRIERS.get(index)
    if buf is None and not torch.cuda.is_current_stream_capturing():
        buf = _BARRIERS[index] = torch.zeros(2, dtype=torch.int32, device=x.device)
    return buf


def persistent_decode_experts(x, scores, ref, tau, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg,
                              out=None, router_in=None, router_out=None, phased=False):
    """x [T, d_in] -> [T, d_out] (d_out = w_out.shape[2]) for a few tokens, in one launch.

    Selection: the kernel's own router (``router_in`` [w, d_in] with rows of stride d_in,
    ``router_out`` [E, w]) when ``scores`` is None; else ``scores >= tau * ref`` (ref None: the row max),
    with the router still computed if given (benchmarks). ``phased`` (or ``"phased": true`` in the
    config): one launch per phase instead of the grid barriers."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    DO = w_out.shape[2]
    if x.is_cuda:  # fp32 weights: tiles of the bf16 config's bytes
        cfg = for_element_size(cfg, w_in.element_size(), ("BLOCK_K", "BLOCK_N", "HIDDEN_BLOCK_K"))
    router = 0 if router_out is None else (1 if scores is None else 2)
    if router and router_in.stride() != (D, 1):
        raise ValueError("persistent decode: router_in rows must be contiguous with stride d_in")
    W = router_in.shape[0] if router else 16
    nprog = num_programs(x, 1)
    phased = phased or cfg.get("phased", False)
    bar = None if phased or INTERPRET or not x.is_cuda else barrier_buffer(x)
    if out is None:
        out = x.new_empty(T, DO)
    hid = torch.empty((T, W), device=x.device, dtype=router_in.dtype) if router else out
    part = torch.empty((nprog, T, DO), device=x.device, dtype=torch.float32)
    n_sel = torch.empty((1,), device=x.device, dtype=torch.int32)
    # each program's copy of the [T, E] selection, read back per slice; one token selected every listed expert
    sel = torch.empty((nprog, T, E), device=x.device, dtype=torch.int8) if T > 1 else n_sel
    gated, has_b_in, has_b_out = w_up is not None, b_in is not None, b_out is not None
    pdl = use_pdl(cfg, x)
    if bar is not None:
        phases = (ALL_PHASES,)
    else:
        phases = (HIDDEN, EXPERTS, REDUCE) if router else (EXPERTS, REDUCE)
    phases = [ph.value for ph in phases]
    block_t = max(16, triton.next_power_of_2(T))
    block_r = max(16, min(cfg["BLOCK_R"], triton.next_power_of_2(E * ES)))
    for phase in phases:
        _persistent_decode_kernel[(nprog,)](
            x, router_in if router else w_in, router_out if router else w_in, scores if router != 1 else out,
            ref if ref is not None else out, float("inf"), float(tau),
            w_in, w_up if gated else w_in, w_out, b_in if has_b_in else w_in, b_out if has_b_out else w_out, out,
            hid, sel, part, n_sel, bar if bar is not None else n_sel, counters,
            T, D, DO, ES, E, W, x.stride(0), scores.stride(0) if router != 1 else 0, out.stride(0),
            GATED=gated, HAS_B_IN=has_b_in, HAS_B_OUT=has_b_out, ACT=ACT_CODES[activation], UPCAST=fp32_dots(x),
            ROUTER=router, HAS_REF=ref is not None and router != 1, PHASE=phase, PDL=pdl, ONE_TOKEN=T == 1,
            BLOCK_T=block_t, BLOCK_EALL=triton.next_power_of_2(E), BLOCK_HW=tile(cfg["HIDDEN_BLOCK_W"], W),
            BLOCK_HK=min(cfg["HIDDEN_BLOCK_K"], triton.next_power_of_2(D)), BLOCK_RW=tile(cfg["TAIL_BLOCK_W"], W),
            BLOCK_R=block_r, BLOCK_K=cfg["BLOCK_K"],
            BLOCK_N=cfg["BLOCK_N"], BLOCK_NR=cfg["BLOCK_N_REDUCE"],
            BLOCK_S=min(cfg["REDUCE_BLOCK_S"], triton.next_power_of_2(nprog)),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **pdl_launch(pdl),
        )
    return out
