"""The converter's reference expert layer on a CUDA GPU (``pytest -m gpu``): its counters stay on the device
until read, so the forwards of calibration, adapt's measurements and the quality sweep never wait on the host."""

import pytest
import torch

from d2dmoe_converter.moe_model import ReferenceMoEMLP, counting
from d2dmoe_kernels.reference import router_scores, select_experts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("top_k", [0, 3])
def test_reference_layer_counts_on_the_device_without_host_sync(top_k):
    E, e, d, w = 8, 16, 64, 32
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device="cuda") / shape[-1] ** 0.5

    t = {"router.in_proj.weight": rand(w, d), "router.out_proj.weight": rand(E, w), "experts.w_in": rand(E, e, d),
         "experts.w_up": rand(E, e, d), "experts.w_out": rand(E, e, d), "experts.b_in": None, "b_out": rand(d)}
    layer = ReferenceMoEMLP(t, tau=0.5, top_k=top_k, activation="relu")
    x = torch.randn(3, 10, d, generator=g, device="cuda")
    rows = torch.rand(3, 10, generator=g, device="cuda") > 0.3   # padding: rows the counters must not see
    layer.record = True
    torch.cuda.set_sync_debug_mode("error")      # any .item() / int() / .cpu() / boolean index raises
    try:
        with counting(layer, rows):
            layer(x)
        layer(x[:1])                             # uncounted-padding forward: every row counts
    finally:
        torch.cuda.set_sync_debug_mode(0)
    flat = x.reshape(-1, d)
    k = select_experts(router_scores(flat, t["router.in_proj.weight"], t["router.out_proj.weight"]), 0.5, top_k).sum(-1)
    kept = k[rows.reshape(-1)].cpu()
    assert layer.tokens == len(kept) + 10
    assert layer.pairs == int(kept.sum()) + int(k[:10].sum())
    recorded = layer.per_token
    assert [r.device.type for r in recorded] == ["cpu", "cpu"]
    assert torch.equal(recorded[0], kept) and torch.equal(recorded[1], k[:10].cpu())
    assert 0 < layer.pairs < layer.tokens * E                   # the selection drops experts
