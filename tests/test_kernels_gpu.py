"""GPU checks of the Triton kernels (run with `pytest -m gpu` on a CUDA machine).

Against the fp64 reference on fresh random inputs in bf16 and fp16; poisoned outputs; CUDA-graph
capture and replay with new inputs and new routing; no host synchronisation (sync debug mode).
"""

import pytest
import torch

from d2dmoe_kernels.dispatch import dynamic_k_experts_triton
from d2dmoe_kernels.reference import dynamic_k_experts_reference, select_experts

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


def make(d, dff, es, gated, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    E = dff // es
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    w = dict(w_in=(r(E, es, d) / d**0.5).to(dtype), w_up=(r(E, es, d) / d**0.5).to(dtype) if gated else None,
             w_out=(r(E, es, d) / dff**0.5).to(dtype), b_in=None if gated else (r(E, es) * 0.1).to(dtype),
             b_out=None if gated else (r(d) * 0.1).to(dtype))
    return w, E, g


def inputs(T, d, E, dtype, g):
    x = torch.randn(T, d, device="cuda", generator=g).to(dtype)
    scores = (torch.rand(T, E, device="cuda", generator=g) ** 3).to(dtype)
    return x, scores


def ref64(x, scores, tau, w, act):
    f64 = {k: None if v is None else v.double() for k, v in w.items()}
    return dynamic_k_experts_reference(x.double(), select_experts(scores, tau), **f64, activation=act)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("T", [1, 4, 16, 64, 300, 2048])
@pytest.mark.parametrize("tau", [0.0, 0.3, 0.7, 1.0])
def test_matches_fp64_reference(dtype, shape, T, tau):
    d, dff, es, gated = shape
    w, E, g = make(d, dff, es, gated, dtype, seed=T + int(tau * 10))
    x, scores = inputs(T, d, E, dtype, g)
    counters = torch.zeros(2, dtype=torch.int64, device="cuda")
    out = dynamic_k_experts_triton(x, scores, tau, 0, *w.values(), "gelu_tanh", counters)
    ref = ref64(x, scores, tau, w, "gelu_tanh")
    assert not torch.isnan(out).any()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err
    assert counters.tolist() == [T, int(select_experts(scores, tau).sum())]


@pytest.mark.parametrize("T", [1, 16, 1000])
def test_every_element_written(T):
    d, dff, es, gated = SHAPES[1]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, 1)
    x, scores = inputs(T, d, E, torch.bfloat16, g)
    from d2dmoe_kernels.configs import kernel_config
    from d2dmoe_kernels.expert_decode import decode_experts
    from d2dmoe_kernels.expert_grouped import grouped_experts
    from d2dmoe_kernels.reference import selection_rule

    cfg = kernel_config(torch.cuda.get_device_name())
    ref_val, factor = selection_rule(scores, 0.9)
    out = torch.full_like(x, float("nan"))
    launch, c = (decode_experts, cfg["decode"]) if T <= cfg["decode"]["max_tokens"] else (grouped_experts, cfg["grouped"])
    launch(x, scores, ref_val, factor, *w.values(), "relu", torch.zeros(2, dtype=torch.int64, device="cuda"), c, out=out)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("T", [1, 8, 512])
def test_cuda_graph_replay_with_new_routing(T):
    d, dff, es, gated = SHAPES[2]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, 2)
    x, scores = inputs(T, d, E, torch.bfloat16, g)
    counters = torch.zeros(2, dtype=torch.int64, device="cuda")
    run = lambda: dynamic_k_experts_triton(x, scores, 0.5, 0, *w.values(), "gelu_tanh", counters)  # noqa: E731
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up compiles the kernels outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for seed in range(3):  # new inputs and new routing, same buffers
        x2, s2 = inputs(T, d, E, torch.bfloat16, torch.Generator(device="cuda").manual_seed(100 + seed))
        x.copy_(x2)
        scores.copy_(s2)
        graph.replay()
        eager = dynamic_k_experts_triton(x, scores, 0.5, 0, *w.values(), "gelu_tanh",
                                         torch.zeros(2, dtype=torch.int64, device="cuda"))
        torch.testing.assert_close(out, eager, rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 16, 1024])
def test_no_host_synchronisation(T):
    d, dff, es, gated = SHAPES[1]
    w, E, g = make(d, dff, es, gated, torch.bfloat16, 4)
    x, scores = inputs(T, d, E, torch.bfloat16, g)
    counters = torch.zeros(2, dtype=torch.int64, device="cuda")
    dynamic_k_experts_triton(x, scores, 0.5, 0, *w.values(), "relu", counters)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for tau, k in ((0.5, 0), (0.0, 0), (0.0, 4)):
            dynamic_k_experts_triton(x, scores, tau, k, *w.values(), "relu", counters)
    finally:
        torch.cuda.set_sync_debug_mode(0)
