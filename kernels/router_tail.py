"""Router tail: scores R = |relu(H) W2^T| and the per-token max, one launch after the first layer.

The router's first layer H = x W1^T is one cuBLAS GEMM (it reads the w x d weights once), or, for
up to ``router.hidden_max_tokens`` tokens, a Triton GEMV-shaped launch over blocks of hidden units
(``_router_hidden_kernel``: it can launch as a programmatic dependent, which cuBLAS cannot);
everything after it -- ReLU, the small second layer (E x w), |.|, the
row max -- runs here, grid (ceil(T / BLOCK_T),), replacing four launches (ReLU, GEMM, abs, amax) and
the fp32 cast of the torch router. Scores are rounded to the model dtype, as the torch router's are,
and the row max is taken over the rounded scores, so selection is the same rule (``selection_rule``).
With ``sum_tau`` (the "sum" reference) the row's reference is min(sum_tau * sum_e R_e, max_e R_e) instead
of the max, to select with factor 1 (the sum in fp32 over expert blocks, the torch rule's summation order
aside).
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.triton_common import (ANY_TOKEN_COUNT, await_producer, fp32_dots, pdl_launch, prefetch_l2,
                                          prefetch_ok, router_hidden_block, router_tile, use_pdl)


def tile(block, n):
    """A dot operand's block: at most ``block``, no larger than n needs, at least 16 (tl.dot's minimum)."""
    return max(16, min(block, triton.next_power_of_2(n)))


@triton.jit(**ANY_TOKEN_COUNT)
def _router_tail_kernel(
    hid_ptr, w2_ptr, scores_ptr, rowmax_ptr, T, E, W, stride_h, stride_s, sum_tau,
    UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_W: tl.constexpr,
    ROWMAX: tl.constexpr, SUM: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr, THREADS: tl.constexpr,
):
    # ROWMAX: one program per token block walks every expert block and writes the row max; else the
    # expert blocks are spread over grid axis 1 (more programs for few tokens) and the consumer
    # takes the row max itself (the fused decode kernel's OWN_MAX).
    e_first = 0 if ROWMAX else tl.program_id(1) * BLOCK_E
    e_last = E if ROWMAX else e_first + BLOCK_E
    if PREFETCH:  # W2 does not depend on the previous kernel: requested while it drains
        if tl.program_id(0) == 0:
            prefetch_l2(w2_ptr + e_first * W, (tl.minimum(e_last, E) - e_first) * W, THREADS)  # E * W < 2^31
    await_producer(PDL)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    rmax = tl.zeros((BLOCK_T,), dtype=tl.float32)
    rsum = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for e0 in range(e_first, e_last, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        emask = offs_e < E
        s = router_tile(hid_ptr, stride_h, w2_ptr, 0, w2_ptr, offs_t, tmask, offs_e, emask, W, UPCAST, BLOCK_T, BLOCK_E,
                        BLOCK_W, False, 16)
        tl.store(scores_ptr + offs_t[:, None] * stride_s + offs_e[None, :], s.to(scores_ptr.dtype.element_ty),
                 mask=tmask[:, None] & emask[None, :])
        rmax = tl.maximum(rmax, tl.max(tl.where(emask[None, :], s, 0.0), axis=1))
        if SUM:
            rsum += tl.sum(tl.where(emask[None, :], s, 0.0), axis=1)
    if SUM:  # the "sum" reference: R_e >= min(tau * sum R, max R) with factor 1 (the arg-max always runs)
        rmax = tl.minimum(sum_tau * rsum, rmax)
    if ROWMAX:
        tl.store(rowmax_ptr + offs_t, rmax, mask=tmask)


@triton.jit(**ANY_TOKEN_COUNT)
def _router_hidden_kernel(
    x_ptr, w1_ptr, hid_ptr, T, D, W, stride_x,
    UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
    PREFETCH: tl.constexpr, THREADS: tl.constexpr,
):
    if PREFETCH:  # W1 does not depend on the previous kernel: requested while it drains
        if tl.program_id(1) == 0:
            w0 = tl.program_id(0) * BLOCK_W
            prefetch_l2(w1_ptr + w0.to(tl.int64) * D, tl.minimum(W - w0, BLOCK_W) * D, THREADS)
    await_producer(PDL)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    wmask = offs_w < W
    h = router_hidden_block(x_ptr, stride_x, w1_ptr, D, offs_t, tmask, offs_w, wmask, UPCAST, BLOCK_T, BLOCK_W, BLOCK_K)
    tl.store(hid_ptr + offs_t[:, None] * W + offs_w[None, :], h, mask=tmask[:, None] & wmask[None, :])


def router_hidden(x, router_in, cfg=None):
    """The router's first layer before its ReLU, [T, w] in the weights' dtype: cuBLAS, or the Triton
    launch for T <= ``cfg["hidden_max_tokens"]`` (``cfg`` the router config; None: cuBLAS)."""
    T, D = x.shape
    if (cfg is None or T > cfg.get("hidden_max_tokens", 0) or router_in.stride() != (D, 1) or x.stride(1) != 1
            or x.dtype != router_in.dtype):  # the kernel's layout and dtype assumptions; cuBLAS takes the rest
        return torch.nn.functional.linear(x, router_in)
    W = router_in.shape[0]
    hid = torch.empty((T, W), device=x.device, dtype=router_in.dtype)
    block_t = max(16, min(cfg.get("HIDDEN_BLOCK_T", 64), triton.next_power_of_2(T)))  # token rows per program
    block_w = tile(cfg.get("HIDDEN_BLOCK_W", 16), W)
    pdl = use_pdl(cfg, x)
    _router_hidden_kernel[(triton.cdiv(W, block_w), triton.cdiv(T, block_t))](
        x, router_in, hid, T, D, W, x.stride(0), UPCAST=fp32_dots(x), BLOCK_T=block_t, BLOCK_W=block_w,
        BLOCK_K=min(cfg.get("HIDDEN_BLOCK_K", 256), triton.next_power_of_2(D)), PDL=pdl,
        PREFETCH=prefetch_ok(cfg.get("HIDDEN_PREFETCH", 0), x, router_in), THREADS=32 * cfg.get("HIDDEN_num_warps", 4),
        num_warps=cfg.get("HIDDEN_num_warps", 4), **pdl_launch(pdl),
    )
    return hid


def router_tail(hid, router_out, cfg, rowmax=True, sum_tau=None):
    """hid [T, w] (first layer, before ReLU), router_out [E, w] -> (scores [T, E] in the weights'
    dtype, rowmax [T] fp32, or None with ``rowmax=False``: expert blocks spread over programs). With
    ``sum_tau`` the second value is the "sum" reference, min(sum_tau * sum_e R_e, max_e R_e)."""
    if sum_tau is not None and not rowmax:
        raise ValueError("router_tail: the sum reference needs one program per token block (rowmax=True)")
    T, W = hid.shape
    E = router_out.shape[0]
    scores = torch.empty((T, E), device=hid.device, dtype=router_out.dtype)
    rmax = torch.empty((T,), device=hid.device, dtype=torch.float32) if rowmax else scores
    pdl = use_pdl(cfg, hid)
    block_t = min(cfg["TAIL_BLOCK_T"], max(16, triton.next_power_of_2(T)))
    block_e = tile(cfg["TAIL_BLOCK_E"] if rowmax else cfg.get("TAIL_SPLIT_BLOCK_E", 16), E)
    num_warps = 4
    _router_tail_kernel[(triton.cdiv(T, block_t), 1 if rowmax else triton.cdiv(E, block_e))](
        hid, router_out, scores, rmax, T, E, W, hid.stride(0), scores.stride(0), float(sum_tau or 0.0),
        UPCAST=fp32_dots(hid), BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_W=tile(cfg["TAIL_BLOCK_W"], W),
        ROWMAX=rowmax, SUM=sum_tau is not None, PDL=pdl, PREFETCH=prefetch_ok(cfg.get("TAIL_PREFETCH", 0), hid, router_out),
        THREADS=32 * num_warps, num_warps=num_warps,
        **pdl_launch(pdl),
    )
    return scores, rmax if rowmax else None
