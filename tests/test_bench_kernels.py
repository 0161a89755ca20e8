"""The kernel benchmark's ``--reference sum`` rows time the same token-expert pairs as its max rows: the
controlled routing decides the experts under either reference, so a sum row differs from a max row only in
the router's reference and the paths it rules out."""

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # as in the other kernel test files: the interpreted kernel modules
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_kernels import make_moe, moe_forward  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from d2dmoe_kernels.reference import dynamic_k_experts_reference  # noqa: E402


@pytest.mark.parametrize("gated,activation", [(True, "gelu_tanh"), (False, "relu")])
def test_sum_rows_run_the_controlled_pairs(gated, activation):
    torch.manual_seed(0)
    T, d, dff, es, width = 5, 32, 128, 16, 16
    E = dff // es
    w = make_moe(d, dff, gated, es, width, torch.float32, device="cpu")
    x = torch.randn(T, d)
    chosen = torch.rand(T, E).argsort(dim=1) < 3  # 3 experts a token, its own
    chosen[0] = False
    chosen[0, 2] = True  # one token picks one expert
    scores = torch.where(chosen, 0.995 + 0.005 * torch.rand(T, E), 0.9 * torch.rand(T, E))
    routing = (scores, scores.amax(-1), 0.99)
    outs = {}
    for reference in ("max", "sum"):
        counters = torch.zeros(3, dtype=torch.int64)
        outs[reference] = moe_forward(x, routing, w, 0.99, activation, counters, reference=reference)
        assert counters[1].item() == chosen.sum().item(), (reference, counters)  # the pairs executed
    want = dynamic_k_experts_reference(x, chosen, w["w_in"], w["w_up"], w["w_out"], w["b_in"], w["b_out"], activation)
    for reference, y in outs.items():
        assert torch.isfinite(y).all()
        err = (y - want).norm() / want.norm()
        assert err < 1e-4, (reference, err)
