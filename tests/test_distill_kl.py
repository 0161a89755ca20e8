"""The sparsify stage's distillation KL: the Triton kernel (TRITON_INTERPRET=1 here) against the torch
reference, which is itself checked against autograd in test_pipeline.py."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before the kernel is built (see test_kernels_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from d2dmoe_converter import distill_kl as dk  # noqa: E402
from d2dmoe_converter.distill_kl_kernel import _kl_rows_kernel  # noqa: E402

assert isinstance(_kl_rows_kernel, InterpretedFunction), "the kernel module was imported before TRITON_INTERPRET was set"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("vocab", [1000, 9000])              # one partial block; several, the last partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 30.0])               # broad and very peaked distributions
def test_kernel_matches_the_torch_reference(vocab, dtype, scale):
    g = torch.Generator().manual_seed(vocab + int(scale))
    # [B, T, V] with non-contiguous batch/position strides, as a slice of the model's logits would be
    s = (torch.randn(5, 2, vocab, generator=g) * scale).to(dtype).transpose(0, 1)
    t = (torch.randn(5, 2, vocab, generator=g) * scale).to(dtype).transpose(0, 1)
    kl, grad = dk.kl_rows_triton(s, t)
    ref_kl, ref_grad = dk.kl_rows_torch(s, t, chunk=3)
    assert kl.shape == (8,) and grad.shape == s.shape and grad.dtype == dtype
    assert torch.isfinite(kl).all() and torch.isfinite(grad.float()).all()
    assert (kl > 0).all() and rel(kl, ref_kl) < 1e-4
    assert rel(grad, ref_grad) < (1e-4 if dtype == torch.float32 else 1e-2)
    assert (grad[:, -1] == 0).all()                                       # the last position predicts nothing


def test_identical_distributions_give_zero():
    t = torch.randn(2, 4, 5000, generator=torch.Generator().manual_seed(1)) * 5
    kl, grad = dk.kl_rows_triton(t.clone(), t)
    assert kl.abs().max() < 1e-5 and grad.abs().max() < 1e-9


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"\[batch, positions >= 2, vocab\]"):
        dk.kl_rows_triton(torch.zeros(2, 1, 10), torch.zeros(2, 1, 10))
    with pytest.raises(ValueError, match=r"\[batch, positions >= 2, vocab\]"):
        dk.kl_rows_torch(torch.zeros(2, 3, 10), torch.zeros(2, 3, 11))
    with pytest.raises(ValueError, match="vocabulary dimension must be contiguous"):
        dk.kl_rows_triton(torch.zeros(2, 3, 10).transpose(1, 2), torch.zeros(2, 3, 10).transpose(1, 2))
