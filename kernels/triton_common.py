"""Shared Triton pieces: the activation, the selection test, and the interpreter switch.

Under ``TRITON_INTERPRET=1`` (CPU tests) bf16/fp16 arithmetic is unreliable, so kernels upcast
their dot operands to fp32 there; on the GPU they feed the tensor cores in the model's dtype.
Accumulation is fp32 everywhere.
"""

import os

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


@triton.jit
def dot_operand(v, UPCAST: tl.constexpr):
    if UPCAST:
        return v.to(tl.float32)
    return v
