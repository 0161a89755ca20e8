"""GPU checks of the Triton kernels (run with `pytest -m gpu` on a CUDA machine).

Against the fp64 reference on fresh random inputs in bf16 and fp16; poisoned outputs; CUDA-graph
capture and replay with new inputs and new routing; no host synchronisation (sync debug mode).
"""

import importlib

import pytest
import torch

from conftest import count_descriptors, with_pdl, with_prefetch, with_tma
from d2dmoe_kernels.configs import kernel_config, path_config, token_tier
from d2dmoe_kernels.reference import dynamic_k_experts_reference, router_scores, select_experts, selection_rule


def lazy(module, name):
    # Kernel modules are imported only when a GPU test runs: importing them at collection would
    # build their Triton functions before the CPU tests switch on TRITON_INTERPRET.
    return lambda *a, **k: getattr(importlib.import_module(module), name)(*a, **k)


dynamic_k_experts_triton = lazy("d2dmoe_kernels.dispatch", "dynamic_k_experts_triton")
fused_router = lazy("d2dmoe_kernels.router", "fused_router")

pytestmark = pytest.mark.gpu

SHAPES = [  # (d, d_ff, expert size, gated)
    (768, 3072, 64, False),      # GPT-2 FFN
    (640, 2048, 32, True),       # Gemma 3 270M FFN
    (2048, 16384, 256, True),    # Gemma-2B FFN
    (256, 1024, 16, True),       # smallest expert size
]


@pytest.fixture(autouse=True)
def need_cuda():
    if not torch.cuda.is_available():
        pytest.fail("GPU tests need CUDA: run them on the GPU machine (pytest -m gpu)")


def make(d, dff, es, gated, dtype, seed, width=128, stacked=False):
    """Random layer weights; ``stacked``: w_in, w_up, router_in in one buffer, as the plugin lays them out."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    E = dff // es
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    w = dict(router_in=(r(width, d) / d**0.5).to(dtype), router_out=(r(E, width) / width**0.5).to(dtype),
             w_in=(r(E, es, d) / d**0.5).to(dtype), w_up=(r(E, es, d) / d**0.5).to(dtype) if gated else None,
             w_out=(r(E, es, d) / dff**0.5).to(dtype), b_in=None if gated else (r(E, es) * 0.1).to(dtype),
             b_out=None if gated else (r(d) * 0.1).to(dtype))
    if stacked:
        from d2dmoe_kernels.layout import stack_up_weights

        views = dict(zip(("w_in", "w_up", "router_in"), stack_up_weights(E, es, d, width, gated, dtype, "cuda")))
        for k, v in views.items():
            if v is not None:
                v.copy_(w[k])
        w.update(views)
    return w, E, g


def inputs(T, d, E, dtype, g):
    x = torch.randn(T, d, device="cuda", generator=g).to(dtype)
    scores = (torch.rand(T, E, device="cuda", generator=g) ** 3).to(dtype)
    return x, scores


EXPERT_KEYS = ("w_in", "w_up", "w_out", "b_in", "b_out")


def experts(w):
    return [w[k] for k in EXPERT_KEYS]


def ref64(x, mask, w, act):
    f64 = {k: None if w[k] is None else w[k].double() for k in EXPERT_KEYS}
    return dynamic_k_experts_reference(x.double(), mask, **f64, activation=act)


def run(x, w, tau, counters, act="gelu_tanh", top_k=0, route_override=None, reference="max"):
    return dynamic_k_experts_triton(x, w["router_in"], w["router_out"], tau, top_k, *experts(w), act, counters,
                                    route_override=route_override, reference=reference)


def poison_allocator(dtype):
    for _ in range(2):  # the allocator's free blocks hold NaN: unwritten hidden units would show
        torch.full((1 << 26,), float("nan"), device="cuda", dtype=dtype)


@pytest.mark.parametrize("stacked", [False, True])  # the plugin's layout: the device's gemm tiers may apply
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 16, 64, 300, 2048])  # 2, 3: the fused path's token tiers
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.7, 1.0])
def test_matches_fp64_reference(dtype, shape, T, tau, stacked):
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, dtype, seed=T + int(tau * 10), stacked=stacked)
    x, scores = inputs(T, d, E, dtype, g)       # controlled routing (the router still runs)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    out = run(x, w, tau, counters, route_override=(scores, *selection_rule(scores, tau)))
    mask = select_experts(scores, tau) if tau > 0 else torch.ones_like(scores, dtype=torch.bool)
    ref = ref64(x, mask, w, "gelu_tanh")
    assert not torch.isnan(out).any()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 16, 64, 300, 2048])
@pytest.mark.parametrize("tau", [0.0, 0.03, 0.1, 1.0])
def test_sum_reference_matches_fp64_reference(shape, T, tau):
    """reference "sum" with the router's own scores, on the device's config (every path it picks by T): the op
    against the fp64 experts on the selection its router makes (the Triton tail's, up to tail_max_tokens), and
    that selection against the torch rule's (bf16 scores rounded apart may flip a pair at the threshold)."""
    from d2dmoe_kernels.dispatch import route

    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=300 + T + int(tau * 100))
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    out = run(x, w, tau, counters, reference="sum")
    cfg = kernel_config(torch.cuda.get_device_name())
    cfg = {**cfg, "router": path_config(cfg, "router", d, es)}   # the op's router keys for this shape
    scores, ref, factor = route(x, w["router_in"], w["router_out"], tau, 0, torch.zeros_like(counters), cfg, False,
                                "sum")
    mask = scores.float() >= factor * ref[:, None] if tau > 0 else torch.ones_like(scores, dtype=torch.bool)
    torch_rule = select_experts(router_scores(x, w["router_in"], w["router_out"]), tau, reference="sum")
    assert (mask != torch_rule).float().mean() <= 0.01
    ref = ref64(x, mask, w, "gelu_tanh")
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("T", [1, 7, 32])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_router(T, shape):
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=T)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    sem = torch.zeros(1, dtype=torch.int64, device="cuda")
    for _ in range(2):
        scores, rowmax = fused_router(x, w["router_in"], w["router_out"], sem, kernel_config(None)["router"])
        want = router_scores(x.double(), w["router_in"].double(), w["router_out"].double())
        assert ((scores.double() - want).norm() / want.norm()).item() < 1e-2
        assert torch.equal(rowmax, scores.amax(-1)) and sem.item() == 0


@pytest.mark.parametrize("T", [1, 4, 32, 300])
def test_end_to_end_with_own_router(T):
    """No override: the op's own router (fused for small T) decides; the reference selects from the
    same scores so threshold ties cannot differ."""
    d, dff, es, gated = SHAPES[1]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=7 + T)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    out = run(x, w, 0.5, counters)
    cfg = kernel_config(torch.cuda.get_device_name())
    if T <= cfg["router"]["max_tokens"]:
        scores, rowmax = fused_router(x, w["router_in"], w["router_out"], torch.zeros(1, dtype=torch.int64,
                                      device="cuda"), cfg["router"])
        mask = scores >= 0.5 * rowmax[:, None]
    elif T <= cfg["router"]["tail_max_tokens"]:  # the op's first layer (cuBLAS or Triton) + the tail's scores
        scores, rowmax = router_tail(router_hidden(x, w["router_in"], cfg["router"]), w["router_out"], cfg["router"])
        mask = scores.float() >= 0.5 * rowmax[:, None]
    else:
        mask = select_experts(router_scores(x, w["router_in"], w["router_out"]), 0.5)
    assert 0 < int(mask.sum()) < T * E
    ref = ref64(x, mask, w, "gelu_tanh")
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("T", [1, 16, 1000])
def test_every_element_written(T):
    d, dff, es, gated = SHAPES[1]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, 1)
    x, scores = inputs(T, d, E, torch.bfloat16, g)
    from d2dmoe_kernels.expert_decode import decode_experts
    from d2dmoe_kernels.expert_grouped import grouped_experts
    from d2dmoe_kernels.reference import selection_rule

    cfg = kernel_config(torch.cuda.get_device_name())
    ref_val, factor = selection_rule(scores, 0.9)
    out = torch.full_like(x, float("nan"))
    launch, c = (decode_experts, cfg["decode"]) if T <= cfg["decode"]["max_tokens"] else (grouped_experts, cfg["grouped"])
    launch(x, scores, ref_val, factor, *experts(w), "relu", torch.zeros(3, dtype=torch.int64, device="cuda"), c, out=out)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("T", [1, 3, 8, 64, 512])
def test_cuda_graph_replay_with_new_routing(T):
    d, dff, es, gated = SHAPES[2]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, 2)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    layer = lambda: run(x, w, 0.5, counters)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        layer()  # warm-up compiles the kernels outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer()
    outs = []
    for seed in range(3):  # new inputs, hence new routing, same buffers
        x.copy_(inputs(T, d, E, torch.bfloat16, torch.Generator(device="cuda").manual_seed(100 + seed))[0])
        graph.replay()
        eager = run(x, w, 0.5, torch.zeros(3, dtype=torch.int64, device="cuda"))
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        outs.append(out.clone())
    assert not torch.equal(outs[0], outs[1])
    assert counters[2].item() == 0


@pytest.mark.parametrize("T", [1, 16, 64, 1024])
def test_no_host_synchronisation(T):
    d, dff, es, gated = SHAPES[1]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, 4)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    for tau, k, ref in ((0.5, 0, "max"), (0.0, 0, "max"), (0.0, 4, "max"), (0.05, 0, "sum")):
        run(x, w, tau, counters, "relu", top_k=k, reference=ref)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for tau, k, ref in ((0.5, 0, "max"), (0.0, 0, "max"), (0.0, 4, "max"), (0.05, 0, "sum")):
            run(x, w, tau, counters, "relu", top_k=k, reference=ref)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("T", [1, 16, 700])
def test_tensor_parallel_shards_add_up(T):
    d, dff, es, gated = SHAPES[1]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=20 + T)
    x, scores = inputs(T, d, E, torch.bfloat16, g)
    routing = (scores, *selection_rule(scores, 0.5))
    full = run(x, w, 0.5, torch.zeros(3, dtype=torch.int64, device="cuda"), route_override=routing)
    tp, parts = 4, []
    for rank in range(tp):
        sl = slice(rank * E // tp, (rank + 1) * E // tp)
        shard = dict(w, w_in=w["w_in"][sl], w_up=w["w_up"][sl], w_out=w["w_out"][sl])
        parts.append(dynamic_k_experts_triton(
            x, w["router_in"], w["router_out"], 0.5, 0, *experts(shard), "gelu_tanh",
            torch.zeros(3, dtype=torch.int64, device="cuda"), route_override=routing, expert_offset=sl.start).float())
    assert ((sum(parts) - full.float()).norm() / full.float().norm()).item() < 1e-2


router_tail = lazy("d2dmoe_kernels.router_tail", "router_tail")
router_hidden = lazy("d2dmoe_kernels.router_tail", "router_hidden")


def own_router_cfg():
    """The device's config with the router's tail inside the fused and masked kernels, masked for 5 <= T <= 256."""
    cfg = kernel_config(torch.cuda.get_device_name())
    return {**cfg, "fused": {**cfg["fused"], "own_router": True},
            "masked": {**cfg["masked"], "min_tokens": 5, "max_tokens": 256, "own_router": True},
            **{k: {**v, "own_router": True} for k, v in cfg.items() if k.startswith(("fused@", "masked@"))}}


@pytest.mark.parametrize("T", [1, 37, 1000])
@pytest.mark.parametrize("shape", SHAPES)
def test_router_tail(T, shape):
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=50 + T)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    scores, rowmax = router_tail(router_hidden(x, w["router_in"]), w["router_out"], kernel_config(None)["router"])
    want = router_scores(x.double(), w["router_in"].double(), w["router_out"].double())
    assert scores.dtype == torch.bfloat16 and not torch.isnan(scores).any()
    assert ((scores.double() - want).norm() / want.norm()).item() < 1e-2
    assert torch.equal(rowmax, scores.float().amax(-1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 16, 200])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_in_kernel_router_matches_reference(dtype, shape, T, tau):
    """Router tail inside the fused / masked kernels, no override: the reference selects from the
    scores the tail kernel computes (same rule, same rounding), so threshold ties cannot differ."""
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, dtype, seed=60 + T)
    x, _ = inputs(T, d, E, dtype, g)
    check_in_kernel_router(x, w, tau, own_router_cfg(), dtype)


def check_in_kernel_router(x, w, tau, cfg, dtype, tol=1e-2):
    """The op through ``cfg`` with its own router against fp64, selecting from the same router
    launches' scores (first layer as ``cfg`` computes it, then the tail)."""
    T = x.shape[0]
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    poison_allocator(dtype)
    out = dynamic_k_experts_triton(x, w["router_in"], w["router_out"], tau, 0, *experts(w), "gelu_tanh", counters,
                                   cfg)
    scores, rowmax = router_tail(router_hidden(x, w["router_in"], cfg["router"]), w["router_out"], cfg["router"])
    mask = scores.float() >= tau * rowmax[:, None]
    ref = ref64(x, mask, w, "gelu_tanh")
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    assert counters.tolist() == [T, int(mask.sum()), 0]


def capture_without_sync(layer, warm):
    """``warm()`` on a side stream (the kernels build outside the capture), then, with host synchronisation an
    error, ``warm()`` again eagerly and ``layer()`` captured into a graph; returns (graph, its output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        warm()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        warm()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = layer()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return graph, out


def check_graph_replay_and_no_sync(shape, T, cfg, seed, stacked=False):
    """Own router, the given config: no host synchronisation while running and capturing; the graph
    replays new inputs (hence new routing) exactly as eager calls compute them."""
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed, stacked=stacked)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    layer = lambda c=counters: dynamic_k_experts_triton(x, w["router_in"], w["router_out"], 0.5, 0, *experts(w),  # noqa: E731
                                                        "relu", c, cfg)
    graph, out = capture_without_sync(layer, layer)
    outs = []
    for seed in range(3):
        x.copy_(inputs(T, d, E, torch.bfloat16, torch.Generator(device="cuda").manual_seed(200 + seed))[0])
        graph.replay()
        eager = layer(torch.zeros(3, dtype=torch.int64, device="cuda"))
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        outs.append(out.clone())
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("T", [1, 8, 64])
def test_in_kernel_router_graph_replay_and_no_sync(T):
    check_graph_replay_and_no_sync(SHAPES[0], T, own_router_cfg(), 3)


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 4, 16, 64, 300, 2048])
@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_fp32_models_match_fp64_reference(shape, T, tau, stacked):
    """fp32 checkpoints through the device config: its tiles were chosen for 2-byte weights, so at
    4 bytes every path and token tier must still fit the device (shared memory) and use exact products."""
    check_override_matches_fp64(shape, T, tau, torch.float32, None, 7 * T + int(tau * 10), stacked, tol=1e-4)


def check_override_matches_fp64(shape, T, tau, dtype, cfg, seed, stacked=False, tol=1e-2):
    """Controlled routing (router paid) through ``cfg``'s paths (None: the device's) against fp64, with
    NaN-poisoned memory: no NaN, relative error below ``tol`` (bf16-level), the device counters exact."""
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, dtype, seed=seed, stacked=stacked)
    x, scores = inputs(T, d, E, dtype, g)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    poison_allocator(dtype)
    out = dynamic_k_experts_triton(x, w["router_in"], w["router_out"], tau, 0, *experts(w), "gelu_tanh", counters,
                                   cfg, route_override=(scores, *selection_rule(scores, tau)))
    mask = select_experts(scores, tau)
    ref = ref64(x, mask, w, "gelu_tanh")
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    assert counters.tolist() == [T, int(mask.sum()), 0]


def balanced_cfg():
    """The device's config with the balanced decode kernel for T <= 4 at every shape (router outside it)."""
    cfg = kernel_config(torch.cuda.get_device_name())
    return {**cfg, **{k: {**v, "max_tokens": 4} for k, v in cfg.items() if k.startswith("balanced")},
            **{k: {**v, "max_tokens": 4, "own_router": False} for k, v in cfg.items() if k.startswith("fused")}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("tau", [0.3, 0.7, 1.0])
def test_balanced_decode_matches_reference(dtype, shape, T, tau):
    """The balanced decode kernel (selected neurons spread evenly over a fixed grid) against fp64,
    outputs and partials from a NaN-poisoned allocator, counters on the device."""
    check_override_matches_fp64(shape, T, tau, dtype, balanced_cfg(), seed=80 + T + int(tau * 10))


@pytest.mark.parametrize("T", [1, 3])
def test_balanced_graph_replay_and_no_sync(T):
    """Router GEMM + tail outside, the balanced decode kernel: capturable, sync-free, replays exactly."""
    check_graph_replay_and_no_sync(SHAPES[2], T, balanced_cfg(), 5)


def gemm_cfg():
    """The device's config with the cuBLAS-GEMM masked path at every token count (stacked weights)."""
    cfg = kernel_config(torch.cuda.get_device_name())
    return {**cfg, **{k: {**v, "min_tokens": 1, "max_tokens": 1 << 30, "by_tokens": []}
                      for k, v in cfg.items() if k.startswith("gemm")}}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 5, 64, 300, 2048])
@pytest.mark.parametrize("tau", [0.3, 0.7, 1.0])
def test_gemm_path_matches_fp64_reference(dtype, shape, T, tau):
    """Controlled routing through the gemm path (router paid), against fp64, NaN-poisoned memory."""
    check_override_matches_fp64(shape, T, tau, dtype, gemm_cfg(), seed=90 + T + int(tau * 10), stacked=True)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 37, 1000])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_gemm_path_own_router(shape, T, tau):
    """No override: the router's first layer from the stacked GEMM, then its tail. The reference
    selects from the tail kernel's scores on the same GEMM's router columns (same rule, same
    rounding), so threshold ties cannot differ; tau = 1 keeps the arg-max (and its ties)."""
    from d2dmoe_kernels.layout import stacked_up_view

    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=110 + T, stacked=True)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    cfg = gemm_cfg()
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    poison_allocator(torch.bfloat16)
    out = dynamic_k_experts_triton(x, w["router_in"], w["router_out"], tau, 0, *experts(w), "relu", counters, cfg)
    hid = (x @ stacked_up_view(w["w_in"], w["w_up"], w["router_in"]).t())[:, -w["router_in"].shape[0]:]
    scores, rowmax = router_tail(hid, w["router_out"], cfg["router"])
    mask = scores.float() >= tau * rowmax[:, None]
    assert (mask.sum(-1) >= 1).all()   # the arg-max always runs (tau = 1: bf16 ties at the max run too)
    ref = ref64(x, mask, w, "relu")
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-2
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("T", [4, 64, 1024])
def test_gemm_path_graph_replay_and_no_sync(shape, T):
    check_graph_replay_and_no_sync(shape, T, gemm_cfg(), 7, stacked=True)


def pdl_cfg(base=None):
    """``base`` (the device's config) with the router tail, fused decode and masked kernels launched as
    programmatic dependents (``"pdl": true``), at every shape key."""
    return with_pdl(base or kernel_config(torch.cuda.get_device_name()))


def test_pdl_is_used_on_this_device():
    """The PDL tests below check something only if the launches really are programmatic dependents
    (sm_90+: the H100 / H200 the configs are for)."""
    from d2dmoe_kernels.triton_common import HAS_PDL, use_pdl

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90+; the PDL tests run plain launches here")
    assert HAS_PDL, "this triton has no grid dependency control (triton >= 3.4 does)"
    assert use_pdl(pdl_cfg()["fused"], torch.empty(1, device="cuda"))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 16, 64])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_pdl_matches_fp64_reference(shape, T, tau):
    check_override_matches_fp64(shape, T, tau, torch.bfloat16, pdl_cfg(), seed=300 + T)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("T", [1, 3, 16, 300])
def test_pdl_graph_replay_and_no_sync(shape, T):
    check_graph_replay_and_no_sync(shape, T, pdl_cfg(), 9)


@pytest.mark.parametrize("T", [1, 8, 64])
def test_pdl_in_kernel_router_graph_replay_and_no_sync(T):
    check_graph_replay_and_no_sync(SHAPES[0], T, pdl_cfg(own_router_cfg()), 11)


def hidden_cfg(base=None):
    """``pdl_cfg(base)`` with the router's first layer as the Triton launch up to 128 tokens (as the H200 file
    has it since attempt 29; here on any device)."""
    cfg = pdl_cfg(base)
    return {**cfg, "router": {**cfg["router"], "hidden_max_tokens": 128}}


@pytest.mark.parametrize("rows", [16, 32, 64])  # token rows per program (HIDDEN_BLOCK_T)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 4, 37, 64, 100, 128])
def test_router_hidden_triton_matches_fp64(shape, T, rows):
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=400 + T)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    hid = router_hidden(x, w["router_in"], {**hidden_cfg()["router"], "HIDDEN_BLOCK_T": rows})
    want = x.double() @ w["router_in"].double().t()
    assert not torch.isnan(hid).any()
    assert ((hid.double() - want).norm() / want.norm()).item() < 1e-2


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 3, 16, 64, 128])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_triton_router_hidden_in_kernel_router_matches_reference(shape, T, tau):
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=450 + T)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    check_in_kernel_router(x, w, tau, hidden_cfg(own_router_cfg()), torch.bfloat16)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("T", [1, 3, 16, 64, 128])
def test_triton_router_hidden_graph_replay_and_no_sync(shape, T):
    check_graph_replay_and_no_sync(shape, T, hidden_cfg(), 13)


@pytest.mark.parametrize("reduce_s", [16, 64, 256])  # slots per reduction step (REDUCE_BLOCK_S)
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("T", [1, 3, 4])
def test_fused_reduce_steps_graph_replay_and_no_sync(shape, T, reduce_s):
    cfg = hidden_cfg()
    check_graph_replay_and_no_sync(shape, T, {**cfg, "fused": {**cfg["fused"], "REDUCE_BLOCK_S": reduce_s}}, 19)


@pytest.mark.parametrize("T", [1, 16, 64, 65, 300, 1024])  # the masked@d640e16 tiers: in-kernel router to 64, spanning tiles
def test_sixteen_neuron_experts_at_gemma3_shape(T):
    shape = (640, 2048, 16, True)
    check_override_matches_fp64(shape, T, 0.5, torch.bfloat16, kernel_config(torch.cuda.get_device_name()), seed=500 + T)
    check_graph_replay_and_no_sync(shape, T, kernel_config(torch.cuda.get_device_name()), 17)


def prefetch_cfg(fused_bits=3, base=None):
    """``hidden_cfg(base)`` with the fused decode kernels' L2 prefetch (``PREFETCH`` bits) and the router
    launches' weight prefetch on, at every shape key."""
    return with_prefetch(hidden_cfg(base), fused_bits)


def test_prefetch_is_used_on_this_device():
    """The prefetch tests below check the inline PTX only where it is compiled in (sm_90+)."""
    from d2dmoe_kernels.triton_common import prefetch_ok

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("cp.async.bulk.prefetch.L2 needs sm_90+; the prefetch tests run without it here")
    w = torch.empty(4, 64, device="cuda", dtype=torch.bfloat16)
    assert prefetch_ok(3, w, w) == 3
    assert prefetch_ok(3, w, w[:, 1:]) == 0  # misaligned rows: off


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("tau", [0.01, 0.5, 1.0])  # nearly every expert .. one expert per token
def test_prefetch_matches_fp64_reference(shape, T, tau, bits):
    check_override_matches_fp64(shape, T, tau, torch.bfloat16, prefetch_cfg(bits), seed=600 + T)


def tma_cfg(base=None):
    """``hidden_cfg(base)`` with the fused decode kernels' weight tiles through tensor descriptors, at every
    shape key (the by_tokens tiers' blocks included)."""
    return with_tma(hidden_cfg(base))


def test_tma_is_used_on_this_device():
    """The TMA tests below check the descriptor loads only where they are compiled in (sm_90+)."""
    from d2dmoe_kernels.triton_common import tma_ok

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need sm_90+; the TMA tests run the pointer loads here")
    w = torch.empty(4, 64, device="cuda", dtype=torch.bfloat16)
    assert tma_ok(1, w, w, None)
    assert not tma_ok(1, w, w[:, 1:])  # misaligned rows: off
    assert not tma_ok(0, w, w)


@pytest.mark.parametrize("T,descriptors", [(1, 0), (2, 3), (3, 3)])
def test_device_config_takes_tma_where_it_says(T, descriptors, monkeypatch):
    """The device's own config at Gemma-2B e=256: on the H200 the T=2-3 tier reads through tensor
    descriptors (w_in, w_up, w_out) and T=1 does not; the result matches fp64 either way."""
    cfg = kernel_config(torch.cuda.get_device_name())
    if descriptors and not token_tier(path_config(cfg, "fused", 2048, 256), T).get("TMA"):
        pytest.skip("this device's config has no TMA tier at Gemma-2B T=2-3")
    made = count_descriptors(monkeypatch)
    check_override_matches_fp64(SHAPES[2], T, 0.5, torch.bfloat16, cfg, seed=780 + T)
    assert len(made) == descriptors


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 4])
@pytest.mark.parametrize("tau", [0.01, 0.5, 1.0])  # nearly every expert .. one expert per token
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tma_matches_fp64_reference(shape, T, tau, dtype):
    check_override_matches_fp64(shape, T, tau, dtype, tma_cfg(), seed=700 + T)


WEIGHT_FEEDS = {  # how the fused decode kernels get their weights: (config over a base, router seed, graph seed)
    "prefetch": (lambda base=None: prefetch_cfg(3, base), 650, 21),
    "tma": (tma_cfg, 750, 23),
}


@pytest.mark.parametrize("feed", list(WEIGHT_FEEDS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_weight_feed_in_kernel_router_matches_reference(feed, shape, T, tau):
    cfg_of, seed, _ = WEIGHT_FEEDS[feed]
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=seed + T)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    check_in_kernel_router(x, w, tau, cfg_of(own_router_cfg()), torch.bfloat16)
    check_in_kernel_router(x, w, tau, cfg_of(), torch.bfloat16)  # router tail kernel (Gemma-2B: split)


@pytest.mark.parametrize("feed", list(WEIGHT_FEEDS))
@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("T", [1, 3, 16])
def test_weight_feed_graph_replay_and_no_sync(feed, shape, T):
    cfg_of, _, seed = WEIGHT_FEEDS[feed]
    check_graph_replay_and_no_sync(shape, T, cfg_of(), seed)


def persistent_cfg(**keys):
    """The device's config with the one-launch decode path for T <= 4 at every shape (its own keys
    where the device file has them; ``keys`` on top, e.g. ``phased=True``: one launch per phase)."""
    cfg = kernel_config(torch.cuda.get_device_name())
    return {**cfg, **{k: {**v, "max_tokens": 4, "pdl": True, **keys} for k, v in cfg.items()
                      if k.startswith("persistent")}}


@pytest.mark.parametrize("phased", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 4])
@pytest.mark.parametrize("tau", [0.01, 0.3, 0.7, 1.0])  # nearly every expert .. one expert per token
def test_persistent_decode_matches_fp64(dtype, shape, T, tau, phased):
    """The one-launch decode path (router paid, controlled routing): grid barriers, or one launch per
    phase, against fp64 with NaN-poisoned memory; the counters exact."""
    check_override_matches_fp64(shape, T, tau, dtype, persistent_cfg(phased=phased), 90 + 7 * T + int(tau * 10),
                                stacked=T == 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("tau", [0.0001, 0.5, 1.0])
def test_persistent_own_router_matches_reference(dtype, shape, T, tau):
    """The kernel's own router (first layer over the programs, the tail in every program): the
    reference selects from the router launches' scores computed with the same blocks (same sums)."""
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, dtype, seed=110 + T)
    x, _ = inputs(T, d, E, dtype, g)
    cfg = persistent_cfg()
    p = path_config(cfg, "persistent", d, es)
    router = {**cfg["router"], "hidden_max_tokens": 128, "HIDDEN_BLOCK_K": p["HIDDEN_BLOCK_K"],
              "TAIL_BLOCK_W": p["TAIL_BLOCK_W"], "pdl": False}
    check_in_kernel_router(x, w, tau, {**cfg, "router": router}, dtype, tol=1e-2 if dtype != torch.float32 else 1e-4)


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("T", [1, 3])
def test_persistent_graph_replay_and_no_sync(shape, T):
    check_graph_replay_and_no_sync(shape, T, persistent_cfg(), 17 + T)


def test_persistent_barrier_survives_many_calls_and_capture_first():
    """64 layer calls per graph, replayed 300 times with new inputs: every replay equals the eager
    calls (the barrier state is left as found: arrivals back at 0). A graph captured before any eager
    call (no barrier buffer yet) takes the phased launches and gives the same result."""
    import d2dmoe_kernels.expert_decode_persistent as pers

    d, dff, es, gated = SHAPES[2]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=5)
    x, _ = inputs(1, d, E, torch.bfloat16, g)
    cfg = persistent_cfg()
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    layer = lambda c=counters: dynamic_k_experts_triton(x, w["router_in"], w["router_out"], 0.3, 0, *experts(w),  # noqa: E731
                                                        "gelu_tanh", c, cfg)
    pers._BARRIERS.clear()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # compile outside the capture (the first launch builds the kernels)
        pers.persistent_decode_experts(x, None, None, 0.3, *experts(w), "gelu_tanh", counters,
                                       path_config(cfg, "persistent", d, es), router_in=w["router_in"],
                                       router_out=w["router_out"], phased=True)
    torch.cuda.current_stream().wait_stream(s)
    pers._BARRIERS.clear()
    first = torch.cuda.CUDAGraph()
    with torch.cuda.graph(first):
        out_first = layer()
    assert not pers._BARRIERS, "no barrier buffer may be made during a capture"
    graph = torch.cuda.CUDAGraph()
    layer()  # eager: makes the barrier buffer
    with torch.cuda.graph(graph):
        outs = [layer() for _ in range(64)]
    for i in range(300):
        x.copy_(torch.randn(1, d, device="cuda", generator=g).to(torch.bfloat16))
        graph.replay()
        first.replay()
        eager = layer(torch.zeros(3, dtype=torch.int64, device="cuda"))
        if i % 50 == 0 or i == 299:
            for o in outs[::21]:
                torch.testing.assert_close(o, eager, rtol=0, atol=0)
            torch.testing.assert_close(out_first, eager, rtol=0, atol=0)
    torch.cuda.synchronize()
    assert pers._BARRIERS[torch.cuda.current_device()][0].item() == 0


def choice_cfg(d, es, fraction=0.4):
    """The device's config with the path chosen on the device (CUDA graph IF nodes) at every T above the fused
    range for (d, es): the gemm path above ``fraction`` of the T x E pairs, the skipping paths below."""
    cfg = kernel_config(torch.cuda.get_device_name())
    return {**cfg, "choice": {"min_tokens": 1, "max_tokens": 0, "fraction": fraction},
            f"choice@d{d}e{es}": {"min_tokens": 1, "max_tokens": 1 << 30}}


@pytest.mark.parametrize("shape", SHAPES[:3])
@pytest.mark.parametrize("T", [64, 300, 2048])
def test_device_choice_runs_the_path_the_selection_asks_for(shape, T):
    """One graph holding both paths under IF nodes, replayed with a sparse (10%) and a dense (90%) selection
    written into the same score buffers: each replay equals, bit for bit, an eager call of the path the
    predicate names (gemm above 40% of the pairs, the skipping path below), stays within bf16 tolerance of the
    fp64 reference, and counts that replay's pairs; capturing does not synchronise with the host. On a torch
    without CUDA graph IF nodes the replay must equal the host rule's eager call instead (the fallback)."""
    import d2dmoe_kernels.dispatch as dispatch
    from d2dmoe_kernels.layout import stacked_up_view

    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, seed=300 + T, stacked=True)
    x, _ = inputs(T, d, E, torch.bfloat16, g)
    cfg = choice_cfg(d, es)
    scores = torch.zeros(T, E, device="cuda", dtype=torch.bfloat16)
    ref = torch.ones(T, device="cuda")
    override = (scores, ref, 0.9)   # chosen experts score 1.0, the others 0.5

    def select(fraction, seed):
        k = max(1, round(fraction * E))
        rank = torch.rand(T, E, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed))
        mask = torch.zeros(T, E, device="cuda", dtype=torch.bool)
        mask.scatter_(1, rank.argsort(dim=1)[:, :k], True)
        scores.copy_(torch.where(mask, 1.0, 0.5).to(torch.bfloat16))
        return mask

    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    layer = lambda c=counters: dynamic_k_experts_triton(x, w["router_in"], w["router_out"], 0.5, 0, *experts(w),  # noqa: E731
                                                        "relu", c, cfg, route_override=override)
    masked = token_tier(path_config(cfg, "masked", d, es), T)
    gemm = token_tier(path_config(cfg, "gemm", d, es), T)
    scratch = torch.zeros(3, dtype=torch.int64, device="cuda")
    paths = {  # the two branches, eagerly, on the same override
        "gemm": lambda: dispatch.gemm_masked_experts(
            x, stacked_up_view(w["w_in"], w["w_up"], w["router_in"]), w["router_out"], 0.9, *experts(w), "relu",
            scratch, gemm, path_config(cfg, "router", d, es), scores=scores, ref=ref),
        "skip": lambda: dispatch.skipping_experts(x, scores, ref, 0.9, *experts(w), "relu", scratch, cfg, masked,
                                                  masked["min_tokens"] <= T <= masked["max_tokens"])}
    select(0.3, 1)
    # eager first: the host rule, and (first call for these kernels) both choice paths, so the capture builds none
    graph, out = capture_without_sync(layer, lambda: layer(torch.zeros(3, dtype=torch.int64, device="cuda")))
    # a torch without IF nodes keeps the host rule inside the capture: the replay is then the eager call's
    branching = dispatch.conditional_nodes()
    if not branching:
        paths["host rule"] = lambda: layer(scratch)
    differ = []
    for i, (fraction, want) in enumerate([(0.1, "skip"), (0.9, "gemm"), (0.1, "skip"), (0.9, "gemm")]):
        want = want if branching else "host rule"
        mask = select(fraction, 10 + i)
        counters.zero_()
        graph.replay()
        eager = {name: run_path().clone() for name, run_path in paths.items()}
        torch.cuda.synchronize()
        assert not torch.isnan(out).any()
        expected = ref64(x, mask, w, "relu")
        assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-2
        assert counters[:2].tolist() == [T, int(mask.sum())]
        differ.append(not torch.equal(eager["gemm"], eager["skip"]) or not branching)
        if differ[-1]:
            torch.testing.assert_close(out, eager[want], rtol=0, atol=0)
    assert any(differ), "the two paths gave the same bits on every selection: the test cannot tell which ran"


def large_t_kernels() -> dict:
    """The Triton kernels of the modules that run at large T, by name."""
    mods = ("expert_grouped", "expert_masked", "expert_masked_gemm", "router_tail")
    return {name: obj for m in mods for name, obj in vars(importlib.import_module(f"d2dmoe_kernels.{m}")).items()
            if name.endswith("_kernel") and hasattr(obj, "device_caches")}


def compiled_variants() -> dict:
    """Compiled variants per large-T kernel (the first item of Triton's per-device cache entry: its kernels)."""
    return {name: sum(len(c[0]) for c in k.device_caches.values()) for name, k in large_t_kernels().items()}


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_new_token_counts_compile_nothing(shape, stacked):
    """Prefill chunks above vLLM's captured sizes run at any T: after one call per token tier, a T of another
    value class (odd, not a multiple of 16) in the same tier compiles no kernel again (session 57: the grouped
    path's kernels compiled mid-serving before they took their token counts unspecialized)."""
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, torch.bfloat16, 57, stacked=stacked)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    # one path and tier per pair (the device files' tiers break at 16, 64, 255-256, 1024, 4095); T and NTB (256-token
    # scan blocks) of another class; 8177: passes of 4096 + 4081 tokens against 4096 + 4080
    pairs = [(496, 497), (2032, 2033), (3856, 3841), (8176, 8177)]
    for k in large_t_kernels().values():   # earlier tests' compiles must not hide a new variant
        k.device_caches.clear()
    for warm, _ in pairs:
        run(inputs(warm, d, E, torch.bfloat16, g)[0], w, 0.5, counters)
    torch.cuda.synchronize()
    before = compiled_variants()
    assert sum(before.values()) > 0, "no large-T kernel ran: the check would prove nothing"
    for _, T in pairs:
        x = inputs(T, d, E, torch.bfloat16, g)[0]
        out = run(x, w, 0.5, counters)
        assert out.shape == (T, d) and not torch.isnan(out).any()
    torch.cuda.synchronize()
    after = compiled_variants()
    assert after == before, {k: (before.get(k), v) for k, v in after.items() if before.get(k) != v}
