"""Prefill / large-batch path (compute-bound): grouped GEMMs over selected token-expert pairs.

1. ``_count_kernel`` (grid: token blocks x experts) counts each block's selected tokens per expert;
   ``_scan_kernel`` (one program) turns the counts into pair offsets (a histogram + prefix sum,
   not an argsort of the T x E mask) and the per-expert tile offsets of the persistent schedule;
   ``_fill_kernel`` writes, in token order, each expert's token list and the [T, E] slot map.
2. ``_grouped_up_kernel``: per (expert, 64-token tile, neuron block), gathers the tile's token
   rows and computes h = act(x w_in^T + b_in) * (x w_up^T) into the compact H [P, e].
3. ``_grouped_down_kernel``: Y [P, d_out] = H w_out per expert tile (fp32 accumulation).
4. ``_gather_reduce_kernel``: out[t] = sum over t's selected experts of Y (fixed expert order,
   fp32) + b_out, written once. No atomics anywhere: results are deterministic.
Both GEMM kernels are persistent: a fixed grid (host-known) walks the tiles that exist, counted
on the device, and finds each tile's expert by binary search over the tile offsets.
Buffers are bounded by processing at most ``chunk_tokens`` tokens per pass.
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.triton_common import (ACT_CODES, ANY_TOKEN_COUNT, expert_hidden, fp32_dots, mma, num_programs,
                                          selected)


@triton.jit(**ANY_TOKEN_COUNT)
def _count_kernel(scores_ptr, rowmax_ptr, tau, counts_ptr, T, NTB, stride_s, BLOCK_T: tl.constexpr):
    tb = tl.program_id(0)
    e = tl.program_id(1)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    sel = selected(scores_ptr, rowmax_ptr, tau, offs_t, offs_t < T, e, stride_s)
    tl.store(counts_ptr + e * NTB + tb, tl.sum(sel.to(tl.int32), axis=0))


@triton.jit(**ANY_TOKEN_COUNT)
def _scan_kernel(counts_ptr, starts_ptr, tile_start_ptr, counters_ptr, T, E, NTB, BM: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    c = tl.load(counts_ptr + offs, mask=offs < E * NTB, other=0)
    incl = tl.cumsum(c, axis=0)
    tl.store(starts_ptr + offs, incl - c, mask=offs < E * NTB)       # exclusive: pair offset of (e, block)
    total = tl.sum(c, axis=0)
    tl.store(starts_ptr + E * NTB, total)                             # total pairs
    tl.atomic_add(counters_ptr, tl.zeros((), tl.int64) + T, sem="relaxed")           # compute accounting
    tl.atomic_add(counters_ptr + 1, total.to(tl.int64), sem="relaxed")
    offs_e = tl.arange(0, BLOCK_E)
    emask = offs_e < E
    # the loads below read what other threads of this program stored above: a block-wide barrier orders them
    # (without it the last expert's `nxt`, the total, could be read before its store; session 57's review)
    tl.debug_barrier()
    first = tl.load(starts_ptr + offs_e * NTB, mask=emask, other=0)
    nxt = tl.load(starts_ptr + (offs_e + 1) * NTB, mask=emask, other=0)
    tiles = tl.where(emask, (nxt - first + BM - 1) // BM, 0)
    tincl = tl.cumsum(tiles, axis=0)
    tl.store(tile_start_ptr + offs_e + 1, tincl, mask=emask)
    tl.store(tile_start_ptr, 0)


@triton.jit(**ANY_TOKEN_COUNT)
def _fill_kernel(scores_ptr, rowmax_ptr, tau, starts_ptr, tokens_ptr, slot_ptr, T, NTB, E, stride_s,
                 BLOCK_T: tl.constexpr):
    tb = tl.program_id(0)
    e = tl.program_id(1)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    sel = selected(scores_ptr, rowmax_ptr, tau, offs_t, tmask, e, stride_s)
    pos = tl.load(starts_ptr + e * NTB + tb) + tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(tokens_ptr + pos, offs_t, mask=sel)
    tl.store(slot_ptr + offs_t * E + e, tl.where(sel, pos, -1), mask=tmask)


@triton.jit
def _find_tile(tile_start_ptr, tile, E, LOG2E: tl.constexpr):
    """Expert e with tile_start[e] <= tile < tile_start[e + 1] (binary search)."""
    lo = 0
    hi = E
    for _ in range(LOG2E):
        mid = (lo + hi) // 2
        go_right = tl.load(tile_start_ptr + mid) <= tile
        lo = tl.where(go_right & (hi - lo > 1), mid, lo)
        hi = tl.where(go_right | (hi - lo <= 1), hi, mid)
    return lo


@triton.jit
def _tile(tile, nch, tile_start_ptr, starts_ptr, E, NTB, LOG2E: tl.constexpr, BM: tl.constexpr):
    """Tile -> (expert, column block, first pair of the expert, its rows in this tile, row mask)."""
    mt = tile // nch
    e = _find_tile(tile_start_ptr, mt, E, LOG2E)
    first = tl.load(starts_ptr + e * NTB)
    count = tl.load(starts_ptr + (e + 1) * NTB) - first
    rows = (mt - tl.load(tile_start_ptr + e)) * BM + tl.arange(0, BM)
    return e, tile % nch, first, rows, rows < count


@triton.jit(**ANY_TOKEN_COUNT)
def _grouped_up_kernel(
    x_ptr, w_in_ptr, w_up_ptr, b_in_ptr, h_ptr, tokens_ptr, starts_ptr, tile_start_ptr,
    D, ES, E, NTB, stride_x,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, LOG2E: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NPROG: tl.constexpr,
):
    nch = tl.cdiv(ES, BN)
    total = tl.load(tile_start_ptr + E) * nch
    for tile in range(tl.program_id(0), total, NPROG):
        e, c, first, rows, rmask = _tile(tile, nch, tile_start_ptr, starts_ptr, E, NTB, LOG2E, BM)
        tok = tl.load(tokens_ptr + first + rows, mask=rmask, other=0).to(tl.int64)
        offs_j = c * BN + tl.arange(0, BN)
        jmask = offs_j < ES
        h = expert_hidden(x_ptr, tok, rmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, e, offs_j, jmask, D, ES,
                          GATED, HAS_BIAS, ACT, UPCAST, BM, BN, BK)
        pair = (first + rows).to(tl.int64)
        tl.store(h_ptr + pair[:, None] * ES + offs_j[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=rmask[:, None] & jmask[None, :])


@triton.jit(**ANY_TOKEN_COUNT)
def _grouped_down_kernel(
    h_ptr, w_out_ptr, y_ptr, starts_ptr, tile_start_ptr,
    DO, ES, E, NTB,
    UPCAST: tl.constexpr, LOG2E: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, NPROG: tl.constexpr,
):
    nch = tl.cdiv(DO, BN)
    total = tl.load(tile_start_ptr + E) * nch
    for tile in range(tl.program_id(0), total, NPROG):
        e, c, first, rows, rmask = _tile(tile, nch, tile_start_ptr, starts_ptr, E, NTB, LOG2E, BM)
        pair = (first + rows).to(tl.int64)
        offs_n = c * BN + tl.arange(0, BN)
        nmask = offs_n < DO
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, ES, BK):
            offs_k = k0 + tl.arange(0, BK)
            kmask = offs_k < ES
            h = tl.load(h_ptr + pair[:, None] * ES + offs_k[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_out_ptr + (e * ES + offs_k).to(tl.int64)[:, None] * DO + offs_n[None, :],
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc += mma(h, w, UPCAST)
        tl.store(y_ptr + pair[:, None] * DO + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=rmask[:, None] & nmask[None, :])


@triton.jit(**ANY_TOKEN_COUNT)
def _gather_reduce_kernel(
    y_ptr, slot_ptr, b_out_ptr, out_ptr, T, DO, E, stride_o,
    HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < DO
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for e in range(E):  # fixed order: deterministic
        slot = tl.load(slot_ptr + offs_t * E + e, mask=tmask, other=-1)
        sel = slot >= 0
        acc += tl.load(y_ptr + slot.to(tl.int64)[:, None] * DO + offs_n[None, :],
                       mask=sel[:, None] & nmask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_out_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_t[:, None] * stride_o + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tmask[:, None] & nmask[None, :])


def grouped_experts(x, scores, rowmax, tau, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, out=None):
    """Launch the grouped path on all T tokens, at most cfg['chunk_tokens'] per pass.
    x [T, d_in] -> [T, d_out] (d_out = w_out.shape[2])."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    DO = w_out.shape[2]
    if out is None:
        out = x.new_empty(T, DO)
    chunk = max(1, min(T, cfg["chunk_tokens"]))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        _grouped_pass(x[t0:t1], scores[t0:t1], rowmax[t0:t1], tau, w_in, w_up, w_out, b_in, b_out,
                      activation, counters, cfg, out[t0:t1], E, ES, D, DO)
    return out


def _grouped_pass(x, scores, rowmax, tau, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, out, E, ES, D,
                  DO):
    T = x.shape[0]
    dev = x.device
    block_t = cfg["BLOCK_T_SCAN"]
    ntb = triton.cdiv(T, block_t)
    bm = cfg["BM"]
    counts = torch.empty(E * ntb, device=dev, dtype=torch.int32)
    starts = torch.empty(E * ntb + 1, device=dev, dtype=torch.int32)
    tile_start = torch.empty(E + 1, device=dev, dtype=torch.int32)
    tokens = torch.empty(T * E, device=dev, dtype=torch.int32)
    slot = torch.empty((T, E), device=dev, dtype=torch.int32)
    h = torch.empty((T * E, ES), device=dev, dtype=x.dtype)
    y = torch.empty((T * E, DO), device=dev, dtype=x.dtype)
    _count_kernel[(ntb, E)](scores, rowmax, tau, counts, T, ntb, scores.stride(0), BLOCK_T=block_t)
    # the scan's block covers a full chunk's E x token blocks, whatever this pass's T: one compile per config, so a
    # pass of a new size (a prefill chunk's remainder, outside any CUDA graph) never compiles it again
    scan_block = triton.next_power_of_2(E * max(ntb, triton.cdiv(cfg["chunk_tokens"], block_t)))
    _scan_kernel[(1,)](counts, starts, tile_start, counters, T, E, ntb, BM=bm, BLOCK=scan_block,
                       BLOCK_E=triton.next_power_of_2(E))
    _fill_kernel[(ntb, E)](scores, rowmax, tau, starts, tokens, slot, T, ntb, E, scores.stride(0), BLOCK_T=block_t)
    log2e = max(1, (E - 1).bit_length() + 1)
    gated, has_b_in, has_b_out = w_up is not None, b_in is not None, b_out is not None
    nprog = num_programs(x, cfg["programs_per_sm"])
    bn_up = min(cfg["BN_UP"], triton.next_power_of_2(ES))
    _grouped_up_kernel[(nprog,)](
        x, w_in, w_up if gated else w_in, b_in if has_b_in else w_in, h, tokens, starts, tile_start,
        D, ES, E, ntb, x.stride(0),
        GATED=gated, HAS_BIAS=has_b_in, ACT=ACT_CODES[activation], UPCAST=fp32_dots(x), LOG2E=log2e,
        BM=bm, BN=bn_up, BK=cfg["BK_UP"], NPROG=nprog, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _grouped_down_kernel[(nprog,)](
        h, w_out, y, starts, tile_start, DO, ES, E, ntb,
        UPCAST=fp32_dots(x), LOG2E=log2e, BM=bm, BN=cfg["BN_DOWN"], BK=min(cfg["BK_DOWN"], triton.next_power_of_2(ES)),
        NPROG=nprog, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    bt, bn = cfg["BLOCK_T_REDUCE"], cfg["BLOCK_N_REDUCE"]
    _gather_reduce_kernel[(triton.cdiv(T, bt), triton.cdiv(DO, bn))](
        y, slot, b_out if has_b_out else y, out, T, DO, E, out.stride(0),
        HAS_BIAS=has_b_out, BLOCK_T=bt, BLOCK_N=bn,
    )
