"""Expert layers whose output width differs from their input width (d_out != d_in).

Attention projections replaced by expert MLPs (Gemma 3 270M q: 640 -> 1024, k/v: 640 -> 256,
o: 1024 -> 640; GPT-2 c_attn: 768 -> 2304): x [T, d_in], w_in/w_up [E, e, d_in], w_out
[E, e, d_out], b_out [d_out] -> [T, d_out]; the router stays [w, d_in], [E, w]. Every path (CPU
body, fused and balanced decode, decode, masked, grouped, dense fallbacks, shards, the op) is checked under
TRITON_INTERPRET=1 against the torch reference, which is itself checked against a per-token loop.
Dispatch by T, top-k, the in-kernel router and the router tail are ``test_kernels_triton.py``'s
tests, parametrised by d_out; the weight, reference and check helpers are that file's. Fresh random
inputs, fp64 relative error, NaN never passes, poisoned outputs, tau from every expert to one
expert, d_out below and above d_in, gated and plain experts with biases.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported (see test_kernels_triton.py)

import pytest  # noqa: E402
import torch  # noqa: E402

import d2dmoe_kernels.op  # noqa: E402,F401
from d2dmoe_kernels.cpu import dynamic_k_experts_cpu  # noqa: E402
from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402
from d2dmoe_kernels.expert_decode import decode_experts  # noqa: E402
from d2dmoe_kernels.expert_decode_balanced import balanced_decode_experts  # noqa: E402
from d2dmoe_kernels.expert_decode_fused import fused_decode_experts  # noqa: E402
from d2dmoe_kernels.expert_grouped import grouped_experts  # noqa: E402
from d2dmoe_kernels.reference import (  # noqa: E402
    apply_activation,
    dynamic_k_experts_reference,
    router_scores,
    select_experts,
    selection_rule,
)
from d2dmoe_kernels.triton_common import INTERPRET  # noqa: E402
from test_kernels_triton import (  # noqa: E402
    BALANCED, DECODE, FUSED, GROUPED, MASKED, SMALL, check, layer, masked_scores, reference, router,
)

assert INTERPRET, "a kernel module was imported before TRITON_INTERPRET was set"

D_IN = 40
D_OUTS = [24, 72]  # below and above d_in; neither a multiple of the 32-wide output blocks

PATHS = {  # path: (launcher, config, token counts)
    "fused": (fused_decode_experts, FUSED, (1, 3)),
    "balanced": (balanced_decode_experts, BALANCED, (1, 3)),
    "decode": (decode_experts, DECODE, (6,)),
    "masked": (masked_scores, MASKED, (21,)),
    "grouped": (grouped_experts, dict(GROUPED, chunk_tokens=16), (23,)),  # two passes
}


def test_reference_matches_a_per_token_loop():
    """The reference itself, for d_out != d_in: token by token, expert by expert, in fp64."""
    for d_out, gated in ((24, True), (72, False)):
        E, ES = 5, 8
        w = {k: None if v is None else v.double() for k, v in layer(E, ES, D_IN, gated, d_out, d_out, True).items()}
        x = torch.randn(4, D_IN, dtype=torch.float64)
        mask = select_experts(torch.rand(4, E), 0.5)
        want = torch.zeros(4, d_out, dtype=torch.float64)
        for t in range(4):
            for e in mask[t].nonzero().flatten().tolist():
                h = apply_activation(w["w_in"][e] @ x[t] + w["b_in"][e], "gelu")
                if gated:
                    h = h * (w["w_up"][e] @ x[t])
                want[t] += w["w_out"][e].t() @ h
            want[t] += w["b_out"]
        check(dynamic_k_experts_reference(x, mask, **w, activation="gelu"), want)  # fp32 inside


@pytest.mark.parametrize("d_out", D_OUTS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tokens", [1, 9])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_cpu_body(d_out, gated, tokens, tau):
    E, ES = 6, 16
    w = layer(E, ES, D_IN, gated, 7 * d_out + tokens, d_out, biases=True)
    x = torch.randn(tokens, D_IN)
    scores = torch.rand(tokens, E) ** 3
    mask = select_experts(scores, tau)
    if tau == 1.0:
        assert (mask.sum(-1) == 1).all()
    check(dynamic_k_experts_cpu(x, mask, **w, activation="gelu_tanh"), reference(x, mask, w, "gelu_tanh"))


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("d_out", D_OUTS)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_kernel_paths(path, d_out, gated, tau):
    E, ES = 7, 24
    launch, cfg, token_counts = PATHS[path]
    for T in token_counts:
        seed = hash((path, d_out, gated, tau, T)) % 10_000
        w = layer(E, ES, D_IN, gated, seed, d_out, biases=True)
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(T, D_IN, generator=g)
        scores = torch.rand(T, E, generator=g) ** 4
        ref_val, factor = selection_rule(scores, tau)
        mask = select_experts(scores, tau)
        if tau == 1.0:
            assert (mask.sum(-1) == 1).all()
        counters = torch.zeros(2, dtype=torch.int64)
        out = torch.full((T, d_out), float("nan"))  # poisoned: every element must be written
        launch(x, scores, ref_val, factor, *w.values(), "gelu_tanh", counters, cfg, out=out)
        check(out, reference(x, mask, w, "gelu_tanh"))
        assert counters.tolist() == [T, int(mask.sum())]
        if tau == 0.5:  # without a given output buffer the launcher allocates [T, d_out]
            fresh = launch(x, scores, ref_val, factor, *w.values(), "gelu_tanh", torch.zeros(2, dtype=torch.int64), cfg)
            assert torch.equal(fresh, out)


@pytest.mark.parametrize("d_out", D_OUTS)
@pytest.mark.parametrize("fallback", ["dense", "masked"])
@pytest.mark.parametrize("how", ["tau=0", "top_k>=E"])
def test_dense_fallbacks(d_out, fallback, how):
    """Every expert selected for sure: cuBLAS dense GEMMs, or the masked kernel with every expert on."""
    E, ES, T = 6, 16, 11
    w = layer(E, ES, D_IN, fallback == "masked", 60, d_out, biases=True)
    x = torch.randn(T, D_IN)
    cfg = dict(SMALL, masked=dict(MASKED, fallback_max_tokens=64 if fallback == "masked" else 0))
    counters = torch.zeros(3, dtype=torch.int64)
    tau, top_k = (0.0, 0) if how == "tau=0" else (0.7, E)
    out = dynamic_k_experts_triton(x, *router(D_IN, E), tau, top_k, *w.values(), "gelu_tanh", counters, cfg)
    check(out, reference(x, torch.ones(T, E, dtype=torch.bool), w, "gelu_tanh"))
    assert counters.tolist() == [T, T * E, 0]


@pytest.mark.parametrize("T", [2, 6, 30])
def test_expert_shards_add_up(T):
    """Tensor parallelism with d_out != d_in: the shards' [T, d_out] outputs add up to the layer."""
    E, ES, tp, d_out = 8, 16, 2, 24
    w = layer(E, ES, D_IN, False, 90, d_out)
    x = torch.randn(T, D_IN)
    r_in, r_out = router(D_IN, E, seed=T)
    parts = []
    for rank in range(tp):
        sl = slice(rank * E // tp, (rank + 1) * E // tp)
        parts.append(dynamic_k_experts_triton(
            x, r_in, r_out, 0.6, 0, w["w_in"][sl], None, w["w_out"][sl], w["b_in"][sl],
            w["b_out"] if rank == 0 else None, "relu", torch.zeros(3, dtype=torch.int64), SMALL,
            expert_offset=sl.start))
    check(sum(parts), reference(x, select_experts(router_scores(x, r_in, r_out), 0.6), w, "relu"))


def _op_args(T, d_out, gated):
    E, ES, width = 6, 8, 16
    w = layer(E, ES, D_IN, gated, 100 + d_out, d_out, biases=True)
    r_in, r_out = router(D_IN, E, width, seed=d_out)
    x = torch.randn(T, D_IN)
    return x, r_in, r_out, w


@pytest.mark.parametrize("d_out", D_OUTS)
@pytest.mark.parametrize("gated", [False, True])
def test_custom_op_eager_and_fake_shape(d_out, gated):
    """The op's CPU body and its fake implementation both give [T, d_out]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    T = 5
    x, r_in, r_out, w = _op_args(T, d_out, gated)
    counters = torch.zeros(3, dtype=torch.int64)
    args = (x, r_in, r_out, 0.5, 0, 0, w["w_in"], w["w_up"], w["w_out"], w["b_in"], w["b_out"], "relu", counters)
    out = torch.ops.d2dmoe.dynamic_k_experts(*args)
    mask = select_experts(router_scores(x, r_in, r_out), 0.5)
    check(out, reference(x, mask, w, "relu"))
    assert counters.tolist() == [T, int(mask.sum()), 0]
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        res = torch.ops.d2dmoe.dynamic_k_experts(*fake)
        assert tuple(res.shape) == (T, d_out) and res.dtype == x.dtype
    if d_out == 72 and not gated:  # schema + fake vs real (slow-ish: once)
        torch.library.opcheck(torch.ops.d2dmoe.dynamic_k_experts.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_custom_op_compiles_with_d_out():
    T, d_out = 4, 72
    x, r_in, r_out, w = _op_args(T, d_out, False)
    counters = torch.zeros(3, dtype=torch.int64)

    def run(x, counters):
        y = torch.ops.d2dmoe.dynamic_k_experts(x, r_in, r_out, 0.5, 0, 0, w["w_in"], w["w_up"], w["w_out"],
                                               w["b_in"], w["b_out"], "relu", counters)
        return y * 2.0  # a consumer of the op's output: needs the fake shape to trace

    compiled = torch.compile(run, fullgraph=True, dynamic=True)(x, counters)
    mask = select_experts(router_scores(x, r_in, r_out), 0.5)
    check(compiled, 2.0 * reference(x, mask, w, "relu"))
