"""The distillation KL kernel and its launch wrapper (``distill_kl.py`` holds the torch reference and the
autograd function that picks between them): one program per position reads the student's and teacher's
logits in place twice, an online log-sum-exp of both with the KL sum, then the gradient written once.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from d2dmoe_converter.distill_kl import check_logits

BLOCK = 4096      # vocabulary entries per load (a sane default for any GPU: no tuning needed at this size)
NUM_WARPS = 8


@triton.jit
def _kl_rows_kernel(s_ptr, t_ptr, g_ptr, kl_ptr, T, V, s_sb, s_st, t_sb, t_st, g_sb, g_st, inv_n,
                    BLOCK: tl.constexpr):
    row = tl.program_id(0)
    b = row // (T - 1)
    p = row % (T - 1)
    s_row = s_ptr + b.to(tl.int64) * s_sb + p.to(tl.int64) * s_st
    t_row = t_ptr + b.to(tl.int64) * t_sb + p.to(tl.int64) * t_st
    g_row = g_ptr + b.to(tl.int64) * g_sb + p.to(tl.int64) * g_st
    m_s = tl.zeros([], dtype=tl.float32) - float("inf")
    m_t = tl.zeros([], dtype=tl.float32) - float("inf")
    l_s = tl.zeros([], dtype=tl.float32)
    l_t = tl.zeros([], dtype=tl.float32)
    acc = tl.zeros([], dtype=tl.float32)   # sum exp(t - m_t) * (t - s)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        s = tl.load(s_row + offs, mask=mask, other=-float("inf")).to(tl.float32)
        t = tl.load(t_row + offs, mask=mask, other=-float("inf")).to(tl.float32)
        ms_new = tl.maximum(m_s, tl.max(s, 0))
        l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(tl.exp(s - ms_new), 0)
        m_s = ms_new
        mt_new = tl.maximum(m_t, tl.max(t, 0))
        rescale = tl.exp(m_t - mt_new)
        e = tl.exp(t - mt_new)
        l_t = l_t * rescale + tl.sum(e, 0)
        diff = tl.where(mask, t, 0.0) - tl.where(mask, s, 0.0)   # 0, not inf - inf, past the vocabulary
        acc = acc * rescale + tl.sum(tl.where(e > 0, e * diff, 0.0), 0)
        m_t = mt_new
    lse_s = m_s + tl.log(l_s)
    lse_t = m_t + tl.log(l_t)
    tl.store(kl_ptr + row, acc / l_t - lse_t + lse_s)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < V
        s = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        g = (tl.exp(s - lse_s) - tl.exp(t - lse_t)) * inv_n
        tl.store(g_row + offs, g.to(g_ptr.dtype.element_ty), mask=mask)


def kl_rows(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL [B * (T - 1)] (fp32) and the mean KL's gradient in the student logits [B, T, V]."""
    check_logits(student, teacher)
    B, T, V = student.shape
    if student.stride(2) != 1 or teacher.stride(2) != 1:
        raise ValueError("distill KL: the logits' vocabulary dimension must be contiguous")
    n = B * (T - 1)
    grad = torch.empty((B, T, V), dtype=student.dtype, device=student.device)
    grad[:, -1].zero_()
    kl = torch.empty(n, dtype=torch.float32, device=student.device)
    # Triton launches on the current device, not the tensors' (the interpreter's are on the CPU)
    with torch.cuda.device(student.device) if student.is_cuda else contextlib.nullcontext():
        _kl_rows_kernel[(n,)](student, teacher, grad, kl, T, V, student.stride(0), student.stride(1),
                              teacher.stride(0), teacher.stride(1), grad.stride(0), grad.stride(1), 1.0 / n,
                              BLOCK=BLOCK, num_warps=NUM_WARPS)
    return kl, grad
