"""KL(teacher || student) of the next-token distributions, with its gradient, for the sparsify stage.

The logits are the step's largest tensors (16 x 512 x 262,144 in bf16: 4.3 GB each for Gemma 3) and the
step is bound by passes over them, not by FLOPs: on an H100 the matrix multiplies take ~27 of its 337 ms,
casts, copies and the chunked torch KL most of the rest (session 40, docs/converter.md "Training longer:
measured"). So on the GPU one Triton program per position reads the student's and the teacher's logits
in place (any float dtype, strided: no slice or fp32 copies), twice: first an online log-sum-exp of both
and the KL sum, then the gradient (softmax(s) - softmax(t)) / N written once, in the student's dtype.
Elsewhere the torch reference below does the same ``chunk`` positions at a time.

Both take the full [B, T, V] logits and use every position but the last (which predicts past the
sequence); the gradient comes back full-size with the last position zero, so autograd does not add a
slice backward (another full-size tensor, zeroed and copied). One fp32 KL per position, summed by torch:
deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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


def check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 3 or student.shape != teacher.shape or student.shape[1] < 2:
        raise ValueError(f"distill KL: student and teacher logits must both be [batch, positions >= 2, vocab]; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def kl_rows_triton(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position KL [B * (T - 1)] (fp32) and the mean KL's gradient in the student logits [B, T, V]."""
    check_logits(student, teacher)
    B, T, V = student.shape
    if student.stride(2) != 1 or teacher.stride(2) != 1:
        raise ValueError("distill KL: the logits' vocabulary dimension must be contiguous")
    n = B * (T - 1)
    grad = torch.empty((B, T, V), dtype=student.dtype, device=student.device)
    grad[:, -1].zero_()
    kl = torch.empty(n, dtype=torch.float32, device=student.device)
    _kl_rows_kernel[(n,)](student, teacher, grad, kl, T, V, student.stride(0), student.stride(1),
                          teacher.stride(0), teacher.stride(1), grad.stride(0), grad.stride(1), 1.0 / n,
                          BLOCK=BLOCK, num_warps=NUM_WARPS)
    return kl, grad


def kl_rows_torch(student: torch.Tensor, teacher: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: the same results in plain torch, ``chunk`` positions at a time in fp32."""
    check_logits(student, teacher)
    B, T, V = student.shape
    s2, t2 = student[:, :-1].reshape(-1, V), teacher[:, :-1].reshape(-1, V)
    n = s2.shape[0]
    grad = torch.zeros((B, T, V), dtype=student.dtype, device=student.device)
    g2 = torch.empty_like(s2)
    kl = torch.empty(n, dtype=torch.float32, device=student.device)
    for i in range(0, n, chunk):
        log_s = torch.log_softmax(s2[i : i + chunk].float(), dim=-1)
        log_t = torch.log_softmax(t2[i : i + chunk].float(), dim=-1)
        p_t = log_t.exp()
        kl[i : i + chunk] = (p_t * (log_t - log_s)).sum(-1)
        g2[i : i + chunk] = ((log_s.exp() - p_t) / n).to(g2.dtype)
    grad[:, :-1] = g2.view(B, T - 1, V)
    return kl, grad


class _DistillKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, chunk):
        kl, grad = kl_rows_triton(student, teacher) if student.is_cuda else kl_rows_torch(student, teacher, chunk)
        ctx.save_for_backward(grad)
        return kl.sum() / kl.numel()

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out), None, None   # in place: the graph holds it for this one backward


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Mean over positions (all but each sequence's last) of KL(teacher || student) of the next-token
    distributions, fp32 math; differentiable in the student logits [B, T, V]."""
    return _DistillKL.apply(student_logits, teacher_logits.detach(), chunk)
