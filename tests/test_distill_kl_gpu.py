"""The distillation KL kernel compiled on a CUDA GPU (``pytest -m gpu``), at the GPU recipe's real size:
16 x 512 positions of Gemma 3's 262,144-entry vocabulary (2^31 logits a tensor: offsets past int32)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def compiled_module():
    from triton.runtime.interpreter import InterpretedFunction

    from d2dmoe_converter import distill_kl as dk
    from d2dmoe_converter.distill_kl_kernel import _kl_rows_kernel

    assert not isinstance(_kl_rows_kernel, InterpretedFunction), \
        "TRITON_INTERPRET was on when the kernel was built: run pytest -m gpu tests/test_distill_kl_gpu.py alone"
    return dk


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_kernel_at_the_recipes_size_matches_the_reference():
    dk = compiled_module()
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (16, 512, 262144)
    s = (torch.randn(shape, generator=g, device="cuda") * 4).to(torch.bfloat16)
    t = (torch.randn(shape, generator=g, device="cuda") * 4).to(torch.bfloat16)
    kl, grad = dk.kl_rows_triton(s, t)
    ref_kl, ref_grad = dk.kl_rows_torch(s, t)
    assert torch.isfinite(kl).all() and rel(kl, ref_kl) < 1e-4
    for b in (0, 15):                       # the last batch row lies past 2^31 elements
        assert rel(grad[b].float(), ref_grad[b].float()) < 1e-2 and (grad[b, -1] == 0).all()
    del ref_grad
    s.requires_grad_(True)
    loss = dk.distill_loss(s, t)            # the autograd path takes the kernel on CUDA
    (3 * loss).backward()
    assert loss.item() == pytest.approx(ref_kl.mean().item(), rel=1e-5)
    assert rel(s.grad[15].float(), 3 * grad[15].float()) < 1e-2
