"""Masked dense path (mid T, and the dense fallback at small T): GEMM-shaped, with the selection
applied to the hidden units, so it reads every expert's weights once at full bandwidth and costs
the launches of the dense MLP.

  up   grid (ceil(T / BLOCK_T), E, ceil(e / BLOCK_J)): a program owns a token block and a slice of
       one expert's neurons. It decides which of its tokens selected the expert (MODE below), and
       writes H[t, e-slice] = act(x w_in^T + b_in) * (x w_up^T) for those tokens and exact zeros
       for the others; a program whose tokens all skipped the expert writes zeros without reading
       its weights (so selections shared across tokens still save bytes). With given scores
       (MODE 0) and e not a multiple of BLOCK_J (small experts) the tiles run over the E*e neurons
       laid end to end, grid (ceil(T / BLOCK_T), 1, ceil(E*e / BLOCK_J)), so one tile may span several small experts (32-neuron experts get
       128-wide GEMM tiles) and the selection is per (token, neuron); it skips its weights when
       no token selected any of its experts.
  down one cuBLAS GEMM over all E*e hidden units, bias in the epilogue: out = H W_out + b_out
       ([T, d_out]; the up kernel only sees the input width d_in; ``down_gemm``).
Zeros contribute exactly nothing, so the result is the masked reference's, with the up GEMM's and
the down GEMM's fp32 accumulation (H is stored in the model dtype, as the dense MLP's is).

MODE 0: selection from given scores and per-token reference (top-k, tensor-parallel shards, or a
        benchmark's controlled routing);
MODE 1: the router's tail in the program (``router_select``): ReLU, second layer, |.| and row max
        from the first layer's output, so the whole layer is router GEMM + up + down (3 launches);
MODE 2: MODE 1's router work (paid) but selection from given scores (benchmarks: the router's cost,
        controlled routing; a runtime ``guard`` = inf keeps the router's result live);
MODE 3: every expert (tau = 0 or top_k >= E): the dense fallback, with no router at all; the experts
        are viewed as one expert of E*e neurons, so blocks need not fit an expert.
Counters (tokens, pairs) are updated on the device by the programs themselves.
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.configs import for_element_size
from d2dmoe_kernels.router_tail import tile
from d2dmoe_kernels.triton_common import (ACT_CODES, ANY_TOKEN_COUNT, await_producer, expert_hidden, fp32_dots,
                                           neuron_selected, pdl_launch, router_select, selected, use_pdl)

MODES = {"scores": 0, "router": 1, "router+override": 2, "all": 3}
# The up kernel's tile widths that shrink for 4-byte weights (``for_element_size``): x [BLOCK_T, BLOCK_K] and
# w_in / w_up [BLOCK_J, BLOCK_K] per stage. The H100 file's d2048 tier for 17-64 tokens (64 x 32 x 256, 3 stages)
# asked 256 KB of shared memory for fp32 weights against 227 KB (docs/kernels.md attempt 40).
TILE_WIDTHS = ("BLOCK_K",)


@triton.jit(**ANY_TOKEN_COUNT)
def _masked_up_kernel(
    x_ptr, hid_ptr, w1_ptr, w2_ptr, scores_ptr, ref_ptr, tau, guard, w_in_ptr, w_up_ptr, b_in_ptr, h_ptr, counters_ptr,
    T, D, ES, E, ER, W, E_OFF, PAIRS, stride_x, stride_h, stride_s,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr, MODE: tl.constexpr,
    FULL_ROUTER: tl.constexpr, SPAN: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_W: tl.constexpr, PDL: tl.constexpr,
):
    await_producer(PDL)
    tb = tl.program_id(0)
    e = tl.program_id(1)
    c = tl.program_id(2)
    offs_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    if SPAN:  # MODE 0, tiles over the E*e neurons laid end to end: a tile may span experts (small experts)
        offs_n = c * BLOCK_J + tl.arange(0, BLOCK_J)
        nmask = offs_n < E * ES
        sel2 = neuron_selected(scores_ptr, ref_ptr, tau, offs_t, tmask, offs_n, nmask, ES, stride_s, counters_ptr, T,
                               (tb == 0) & (c == 0))
        n_any = tl.sum(tl.sum(sel2.to(tl.int32), axis=1), axis=0)
        hp = h_ptr + offs_t.to(tl.int64)[:, None] * (E * ES) + offs_n[None, :]
        hmask = tmask[:, None] & nmask[None, :]
        if n_any == 0:
            tl.store(hp, tl.zeros((BLOCK_T, BLOCK_J), dtype=h_ptr.dtype.element_ty), mask=hmask)
        else:
            h = expert_hidden(x_ptr, offs_t, tmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, 0, offs_n, nmask, D, ES,
                              GATED, HAS_BIAS, ACT, UPCAST, BLOCK_T, BLOCK_J, BLOCK_K)
            tl.store(hp, tl.where(sel2, h, 0.0).to(h_ptr.dtype.element_ty), mask=hmask)
        return
    if MODE == 3:
        sel = tmask
    elif MODE == 0:  # tiles inside one expert: one selection per token, no [BLOCK_T, BLOCK_J] mask held
        sel = selected(scores_ptr, ref_ptr, tau, offs_t, tmask, e, stride_s)
    else:
        s_e, rmax = router_select(hid_ptr, stride_h, w1_ptr, D, w2_ptr, offs_t, tmask, e + E_OFF, ER, W,
                                  UPCAST, BLOCK_T, BLOCK_E, BLOCK_W, FULL_ROUTER, BLOCK_K)
        if MODE == 1:
            sel = (s_e >= tau * rmax) & tmask
        else:
            sel = (selected(scores_ptr, ref_ptr, tau, offs_t, tmask, e, stride_s) | (s_e > guard)) & tmask
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    if c == 0:  # compute accounting: pairs once per (token block, expert), tokens once
        tl.atomic_add(counters_ptr + 1, n_sel.to(tl.int64) * PAIRS, sem="relaxed")
        if (tb == 0) & (e == 0):
            tl.atomic_add(counters_ptr, tl.zeros((), tl.int64) + T, sem="relaxed")
    offs_j = c * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = offs_j < ES
    hp = h_ptr + offs_t.to(tl.int64)[:, None] * (E * ES) + (e * ES + offs_j)[None, :]
    hmask = tmask[:, None] & jmask[None, :]
    if n_sel == 0:
        tl.store(hp, tl.zeros((BLOCK_T, BLOCK_J), dtype=h_ptr.dtype.element_ty), mask=hmask)
    else:
        h = expert_hidden(x_ptr, offs_t, tmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, e, offs_j, jmask, D, ES,
                          GATED, HAS_BIAS, ACT, UPCAST, BLOCK_T, BLOCK_J, BLOCK_K)
        h = tl.where(sel[:, None], h, 0.0)
        tl.store(hp, h.to(h_ptr.dtype.element_ty), mask=hmask)


def masked_dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, mode, scores=None, ref=None,
                         tau=0.0, hid=None, router_out=None, expert_offset=0, router_in=None):
    """x [T, d_in] -> [T, d_out] (d_out = w_out.shape[2]). ``mode`` one of MODES; ``scores``/``ref`` for modes 0 and 2 (scores
    indexed by local expert), ``hid`` (router first layer, before ReLU) and ``router_out`` for modes
    1 and 2 (router expert = expert_offset + local expert; the row max is over all router experts);
    with ``hid`` None there, the programs compute the router's first layer too, from ``router_in``."""
    T, D = x.shape
    E, ES, _ = w_in.shape
    DO = w_out.shape[2]
    if x.is_cuda:  # fp32 weights: tiles of the bf16 config's bytes (the interpreter has no shared-memory limit)
        cfg = for_element_size(cfg, w_in.element_size(), TILE_WIDTHS)
    m = MODES[mode]
    pairs = 1
    full = m in (1, 2) and hid is None
    if m == 3:  # every expert: one expert of E*e neurons (blocks need not fit an expert); E pairs per token
        pairs, E, ES = E, 1, E * ES
        w_in, w_out = w_in.reshape(1, ES, D), w_out.reshape(1, ES, DO)
        w_up = None if w_up is None else w_up.reshape(1, ES, D)
        b_in = None if b_in is None else b_in.reshape(1, ES)
    block_t = tile(cfg["BLOCK_T"], T)
    block_j = tile(cfg["BLOCK_J"], E * ES if m == 0 else ES)
    # spanning tiles only where a tile cannot sit inside one expert: per-neuron selection costs registers
    # (Gemma-2B e=256, T=64-256: 69.5 -> 76.1 and 114 -> 133 us with them, H200)
    span = m == 0 and ES % block_j != 0
    h = torch.empty((T, E * ES), device=x.device, dtype=x.dtype)
    gated, has_b_in = w_up is not None, b_in is not None
    ER, W = (router_out.shape[0], router_out.shape[1]) if m in (1, 2) else (E, 16)
    grid = (triton.cdiv(T, block_t), 1, triton.cdiv(E * ES, block_j)) if span else \
        (triton.cdiv(T, block_t), E, triton.cdiv(ES, block_j))
    pdl = use_pdl(cfg, x)
    _masked_up_kernel[grid](
        x, hid if hid is not None else x, router_in if full else w_in, router_out if router_out is not None else w_in,
        scores if scores is not None else x, ref if ref is not None else x, float(tau), float("inf"),
        w_in, w_up if gated else w_in, b_in if has_b_in else w_in, h, counters,
        T, D, ES, E, ER, W, expert_offset, pairs, x.stride(0), hid.stride(0) if hid is not None else x.stride(0),
        scores.stride(0) if scores is not None else 0,
        GATED=gated, HAS_BIAS=has_b_in, ACT=ACT_CODES[activation], UPCAST=fp32_dots(x), MODE=m, FULL_ROUTER=full, SPAN=span,
        BLOCK_T=block_t, BLOCK_J=block_j, BLOCK_K=cfg["BLOCK_K"], BLOCK_E=tile(cfg["ROUTER_BLOCK_E"], ER),
        BLOCK_W=tile(cfg["ROUTER_BLOCK_W"], W), PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **pdl_launch(pdl),
    )
    return down_gemm(h, w_out, b_out, x)


def down_gemm(h, w_out, b_out, x):
    """The cuBLAS down GEMM over all E*e hidden units, bias in the epilogue: H [T, E*e] -> [T, d_out]."""
    w2 = w_out.reshape(-1, w_out.shape[2])
    if fp32_dots(x) and x.dtype != torch.float32:  # interpreter: fp32 products, as the kernels' mma does
        out = h.float() @ w2.float()
        return (out if b_out is None else out + b_out.float()).to(x.dtype)
    return h @ w2 if b_out is None else torch.addmm(b_out, h, w2)
