"""Fused router for few tokens: R = |W2 relu(W1 x)| and the per-token max, in one launch.

grid (ceil(w / BLOCK_W),): each program computes a block of the hidden layer relu(x W1^T) for all
T tokens and stores it; the last program to finish (an atomic ticket on a semaphore that it resets
for the next call, so CUDA-graph replays work) computes the second layer, the scores and the row
max. Replaces four launches (two GEMMs, ReLU, abs) and the row-max reduction of the torch router.
"""

import torch
import triton
import triton.language as tl

from d2dmoe_kernels.triton_common import fp32_dots, mma

MAX_SECOND_LAYER = 1 << 16  # E * w handled by the last program; larger routers use cuBLAS


@triton.jit
def _router_kernel(
    x_ptr, w1_ptr, w2_ptr, hid_ptr, scores_ptr, rowmax_ptr, sem_ptr,
    T, D, W, E, stride_x,
    UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_W2: tl.constexpr,
):
    offs_t = tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    wmask = offs_w < W
    acc = tl.zeros((BLOCK_T, BLOCK_W), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < D
        xk = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=tmask[:, None] & kmask[None, :], other=0.0)
        w1 = tl.load(w1_ptr + offs_w.to(tl.int64)[:, None] * D + offs_k[None, :], mask=wmask[:, None] & kmask[None, :],
                     other=0.0)
        acc += mma(xk, tl.trans(w1), UPCAST)
    tl.store(hid_ptr + offs_t[:, None] * W + offs_w[None, :], tl.maximum(acc, 0.0), mask=tmask[:, None] & wmask[None, :])
    ticket = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:  # every hidden block is written: second layer
        rmax = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            emask = offs_e < E
            acc2 = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
            for j0 in range(0, W, BLOCK_W2):
                offs_j = j0 + tl.arange(0, BLOCK_W2)
                jmask = offs_j < W
                hid = tl.load(hid_ptr + offs_t[:, None] * W + offs_j[None, :], mask=tmask[:, None] & jmask[None, :],
                              other=0.0, cache_modifier=".cg")
                w2 = tl.load(w2_ptr + offs_e[:, None] * W + offs_j[None, :], mask=emask[:, None] & jmask[None, :],
                             other=0.0).to(tl.float32)
                acc2 += mma(hid, tl.trans(w2), True)
            s = tl.abs(acc2)
            tl.store(scores_ptr + offs_t[:, None] * E + offs_e[None, :], s, mask=tmask[:, None] & emask[None, :])
            rmax = tl.maximum(rmax, tl.max(tl.where(emask[None, :], s, 0.0), axis=1))
        tl.store(rowmax_ptr + offs_t, rmax, mask=tmask)
        tl.atomic_xchg(sem_ptr, 0)


def fused_router_fits(num_experts: int, width: int) -> bool:
    return num_experts * width <= MAX_SECOND_LAYER


def fused_router(x, w1, w2, semaphore, cfg):
    """x [T, d] (T small), w1 [w, d], w2 [E, w], semaphore: int64 scalar slot that is 0 between calls.
    Returns (scores [T, E] fp32, rowmax [T] fp32)."""
    T, D = x.shape
    W, E = w1.shape[0], w2.shape[0]
    hid = torch.empty((T, W), device=x.device, dtype=torch.float32)
    scores = torch.empty((T, E), device=x.device, dtype=torch.float32)
    rowmax = torch.empty((T,), device=x.device, dtype=torch.float32)
    block_w = min(cfg["BLOCK_W"], triton.next_power_of_2(W))
    _router_kernel[(triton.cdiv(W, block_w),)](
        x, w1, w2, hid, scores, rowmax, semaphore, T, D, W, E, x.stride(0),
        UPCAST=fp32_dots(x), BLOCK_T=max(16, triton.next_power_of_2(T)), BLOCK_W=block_w, BLOCK_K=cfg["BLOCK_K"],
        BLOCK_E=min(64, triton.next_power_of_2(E)), BLOCK_W2=min(64, triton.next_power_of_2(W)),
        num_warps=cfg["num_warps"],
    )
    return scores, rowmax
