"""Shared Triton pieces: the activation, the selection test, and the matrix product.

Accumulation is fp32 everywhere. Dot operands stay in the model's dtype (bf16/fp16 tensor cores),
except for fp32 models, whose products are full fp32 (no TF32 rounding), and under
``TRITON_INTERPRET=1`` (CPU tests), where bf16/fp16 arithmetic is unreliable: there ``mma`` upcasts.
"""

import os

import torch

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACT_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2}


@triton.jit
def activation(h, ACT: tl.constexpr):
    if ACT == 0:
        return tl.maximum(h, 0.0)
    elif ACT == 1:  # exact GELU
        return 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))
    else:  # tanh approximation; tanh(u) = 2 sigmoid(2u) - 1
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        return 0.5 * h * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))


@triton.jit
def selected(scores_ptr, rowmax_ptr, tau, offs_t, tmask, e, stride_s):
    """Boolean [BLOCK_T]: token t runs expert e (R_te >= tau * max_e R_te)."""
    s = tl.load(scores_ptr + offs_t * stride_s + e, mask=tmask, other=-1.0).to(tl.float32)
    m = tl.load(rowmax_ptr + offs_t, mask=tmask, other=0.0).to(tl.float32)
    return (s >= tau * m) & tmask


def fp32_dots(x) -> bool:
    """The UPCAST switch of the kernels for input ``x``."""
    return INTERPRET or x.dtype == torch.float32


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def count_selected(sel, counters_ptr, e, c, T):
    """Compute accounting from a per-expert program: pairs executed (once per expert), tokens (once)."""
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    if c == 0:
        tl.atomic_add(counters_ptr + 1, n_sel.to(tl.int64))
        if e == 0:
            tl.atomic_add(counters_ptr, tl.zeros((), tl.int64) + T)
    return n_sel


@triton.jit
def expert_hidden(
    x_ptr, x_rows, xmask, stride_x, w_in_ptr, w_up_ptr, b_in_ptr, e, offs_j, jmask, D, ES,
    GATED: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """h = act(x w_in^T + b_in) * (x w_up^T) for token rows ``x_rows`` and neurons ``offs_j`` of
    expert e: the first half of every expert kernel, fp32 accumulation, [BM, BN]."""
    w_rows = (e * ES + offs_j).to(tl.int64) * D
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc_up = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        offs_k = k0 + tl.arange(0, BK)
        kmask = offs_k < D
        xk = tl.load(x_ptr + x_rows[:, None] * stride_x + offs_k[None, :], mask=xmask[:, None] & kmask[None, :],
                     other=0.0)
        wmask = jmask[:, None] & kmask[None, :]
        acc += mma(xk, tl.trans(tl.load(w_in_ptr + w_rows[:, None] + offs_k[None, :], mask=wmask, other=0.0)), UPCAST)
        if GATED:
            wu = tl.load(w_up_ptr + w_rows[:, None] + offs_k[None, :], mask=wmask, other=0.0)
            acc_up += mma(xk, tl.trans(wu), UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_in_ptr + e * ES + offs_j, mask=jmask, other=0.0).to(tl.float32)[None, :]
    h = activation(acc, ACT)
    if GATED:
        h = h * acc_up
    return h
