"""KL(teacher || student) of the next-token distributions, with its gradient, for the sparsify stage.

The logits are the step's largest tensors (16 x 512 x 262,144 in bf16: 4.3 GB each for Gemma 3) and the
step is bound by passes over them, not by FLOPs: on an H100 the matrix multiplies take ~27 of its 337 ms,
casts, copies and the chunked torch KL most of the rest (session 40, docs/converter.md "Training longer:
measured"). So on the GPU one Triton program per position reads the student's and the teacher's logits
in place (any float dtype, strided: no slice or fp32 copies), twice: first an online log-sum-exp of both
and the KL sum, then the gradient (softmax(s) - softmax(t)) / N written once, in the student's dtype.
Elsewhere the torch reference below does the same ``chunk`` positions at a time. The kernel and its
launch wrapper are in ``distill_kl_kernel.py``.

Both take the full [B, T, V] logits and use every position but the last (which predicts past the
sequence); the gradient comes back full-size with the last position zero, so autograd does not add a
slice backward (another full-size tensor, zeroed and copied). One fp32 KL per position, summed by torch:
deterministic.
"""

from __future__ import annotations

import torch


def check_logits(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.dim() != 3 or student.shape != teacher.shape or student.shape[1] < 2:
        raise ValueError(f"distill KL: student and teacher logits must both be [batch, positions >= 2, vocab]; got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def kl_rows_triton(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel's results (``distill_kl_kernel.kl_rows``; imported on first use, so importing the
    converter does not build Triton functions)."""
    from d2dmoe_converter.distill_kl_kernel import kl_rows

    return kl_rows(student, teacher)


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
