"""The cuBLAS-GEMM masked path (``expert_masked_gemm.py``) and the stacked weight layout it needs,
under TRITON_INTERPRET=1 against the torch reference.

The router's first layer is stacked into the up GEMM, its tail runs on the GEMM's router columns,
the selection and activation in one elementwise Triton kernel. Fresh random inputs, relative error in fp64, NaN never passes, the hidden
buffer poisoned first; tau from all experts to one expert, expert sizes that do and do not divide
the column tiles, experts that get no token, tensor-parallel shards, bf16.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from d2dmoe_kernels import dispatch  # noqa: E402
from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402
from d2dmoe_kernels.expert_masked_gemm import gemm_masked_experts  # noqa: E402
from d2dmoe_kernels.layout import stack_up_weights, stacked_up_view  # noqa: E402
from d2dmoe_kernels.reference import router_scores, select_experts, selection_rule  # noqa: E402
from test_kernels_triton import check, reference  # noqa: E402  (fp64 reference, relative error, no NaN)

GEMM = dict(min_tokens=1, max_tokens=64, BLOCK_T=16, BLOCK_C=32, num_warps=4)
ROUTER = dict(TAIL_BLOCK_T=16, TAIL_BLOCK_E=16, TAIL_BLOCK_W=16)


def stacked_layer(E, ES, D, W, gated, biases, seed, dtype=torch.float32, d_out=None):
    """Expert + router weights with w_in, w_up, router_in in one buffer (the plugin's layout)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d_out = D if d_out is None else d_out
    w_in, w_up, r_in = stack_up_weights(E, ES, D, W, gated, dtype=dtype)
    w_in.copy_(r(E, ES, D) / D**0.5)
    if gated:
        w_up.copy_(r(E, ES, D) / D**0.5)
    r_in.copy_(r(W, D) / D**0.5)
    w = dict(w_in=w_in, w_up=w_up, w_out=(r(E, ES, d_out) / (E * ES) ** 0.5).to(dtype),
             b_in=(r(E, ES) * 0.1).to(dtype) if biases else None, b_out=(r(d_out) * 0.1).to(dtype) if biases else None)
    return w, r_in, (r(E, W) / W**0.5).to(dtype)


def run(x, w, r_in, r_out, tau, activation, counters, cfg=GEMM, **kw):
    T = x.shape[0]
    E, ES, _ = w["w_in"].shape
    hidden = torch.full((T, E * ES), float("nan"), dtype=x.dtype)   # poisoned: the kernel writes every element
    return gemm_masked_experts(x, stacked_up_view(w["w_in"], w["w_up"], r_in), r_out, tau, *w.values(), activation,
                               counters, cfg, ROUTER, hidden=hidden, **kw)


@pytest.mark.parametrize("T", [1, 37])
@pytest.mark.parametrize("gated,activation,ES,biases", [(False, "gelu", 32, True), (True, "relu", 16, False),
                                                        (True, "gelu_tanh", 48, False), (False, "relu", 24, True),
                                                        (True, "relu", 64, True)])
@pytest.mark.parametrize("tau", [0.0, 0.4, 0.8, 1.0])
def test_gemm_path_matches_reference(T, gated, activation, ES, biases, tau):
    """Selection by the stacked router equals the torch router's; output and counters equal the
    masked reference's. ES 24/48 do not divide the 32-column tiles, 64 spans two tiles."""
    seed = hash((T, gated, activation, ES, tau)) % 10_000
    E, D = 20, 40            # 20 router experts: two expert blocks of 16 in the tail
    w, r_in, r_out = stacked_layer(E, ES, D, 24, gated, biases, seed)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(seed + 1))
    counters = torch.zeros(3, dtype=torch.int64)
    out = run(x, w, r_in, r_out, tau, activation, counters)
    mask = select_experts(router_scores(x, r_in, r_out), tau)
    if tau == 1.0:
        assert (mask.sum(-1) == 1).all()
    if tau == 0.0:
        assert mask.all()
    check(out, reference(x, mask, w, activation))
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_given_scores_idle_experts_and_one_expert_tokens(dtype, tol):
    """Benchmark routing (router paid, given scores select): experts no token picks, tokens that pick
    exactly one expert, a token that picks all of them."""
    E, ES, D, T = 9, 16, 32, 23
    w, r_in, r_out = stacked_layer(E, ES, D, 16, True, False, 3, dtype)
    x = torch.randn(T, D).to(dtype)
    scores = torch.rand(T, E) * 0.5
    scores[:, [2, 5]] = 0.0                        # experts 2 and 5: no token
    scores[: T // 2, 7] = 1.0                      # the first half keeps expert 7 alone
    scores[-1] = 1.0                               # the last token keeps every expert
    scores[-1, [2, 5]] = 1.0
    ref_val, factor = selection_rule(scores, 0.9)
    mask = select_experts(scores, 0.9)
    assert (mask[: T // 2].sum(-1) == 1).all() and not mask[:-1, [2, 5]].any() and mask[-1].all()
    counters = torch.zeros(3, dtype=torch.int64)
    out = run(x, w, r_in, r_out, factor, "gelu_tanh", counters, scores=scores, ref=ref_val)
    check(out, reference(x, mask, w, "gelu_tanh"), tol)
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_shards_add_up(tau):
    """Tensor parallelism: each rank's local experts (stacked with the full router), selected
    against the row max over all router experts, sum to the whole layer."""
    E, ES, D, W, T, tp = 12, 16, 32, 24, 19, 3
    full, r_in, r_out = stacked_layer(E, ES, D, W, False, True, 7)
    x = torch.randn(T, D)
    mask = select_experts(router_scores(x, r_in, r_out), tau)
    parts, pairs = [], 0
    for rank in range(tp):
        sl = slice(rank * E // tp, (rank + 1) * E // tp)
        w_in, _, ri = stack_up_weights(E // tp, ES, D, W, False)
        w_in.copy_(full["w_in"][sl])
        ri.copy_(r_in)
        w = dict(w_in=w_in, w_up=None, w_out=full["w_out"][sl], b_in=full["b_in"][sl],
                 b_out=full["b_out"] if rank == 0 else None)
        counters = torch.zeros(3, dtype=torch.int64)
        parts.append(run(x, w, ri, r_out, tau, "relu", counters, expert_offset=sl.start))
        pairs += int(counters[1])
    check(sum(parts), reference(x, mask, full, "relu"))
    assert pairs == int(mask.sum())


def test_dispatch_takes_the_gemm_path_only_for_stacked_weights(monkeypatch):
    """In range and stacked: the gemm path; the same weights as separate tensors: another path, the
    same result."""
    E, ES, D, T = 10, 16, 32, 21
    w, r_in, r_out = stacked_layer(E, ES, D, 24, True, False, 13)
    x = torch.randn(T, D)
    calls = []
    real = dispatch.gemm_masked_experts
    monkeypatch.setattr(dispatch, "gemm_masked_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = dispatch.kernel_config(None)
    cfg = dict(cfg, gemm=dict(cfg["gemm"], **GEMM), masked=dict(cfg["masked"], BLOCK_T=16, BLOCK_J=16, BLOCK_K=32),
               router=dict(cfg["router"], **ROUTER))
    mask = select_experts(router_scores(x, r_in, r_out), 0.5)
    want = reference(x, mask, w, "gelu_tanh")
    out = dynamic_k_experts_triton(x, r_in, r_out, 0.5, 0, *w.values(), "gelu_tanh", torch.zeros(3, dtype=torch.int64),
                                   cfg)
    assert calls == [1]
    check(out, want)
    apart = {k: None if v is None else v.clone() for k, v in w.items()}
    out = dynamic_k_experts_triton(x, r_in.clone(), r_out, 0.5, 0, *apart.values(), "gelu_tanh",
                                   torch.zeros(3, dtype=torch.int64), cfg)
    assert calls == [1]
    check(out, want)


def test_stacked_view_only_over_one_buffer_in_order():
    w_in, w_up, r_in = stack_up_weights(4, 8, 16, 6, True)
    for i, t in enumerate((w_in, w_up, r_in)):  # the buffer is uninitialised (NaN-free values to compare)
        t.copy_(torch.randn(t.shape) + 10 * i)
    view = stacked_up_view(w_in, w_up, r_in)
    assert view.shape == (4 * 8 * 2 + 6, 16)
    assert view.data_ptr() == w_in.data_ptr()
    torch.testing.assert_close(view[:32], w_in.reshape(32, 16), rtol=0, atol=0)
    torch.testing.assert_close(view[-6:], r_in, rtol=0, atol=0)
    assert stacked_up_view(w_up, w_in, r_in) is None                 # wrong order
    assert stacked_up_view(w_in, None, r_in) is None                 # not adjacent (w_up between)
    assert stacked_up_view(w_in, w_up, r_in.clone()) is None         # router in another buffer
    assert stacked_up_view(w_in.clone(), w_up.clone(), r_in.clone()) is None
    plain_in, none, plain_r = stack_up_weights(4, 8, 16, 6, False)
    assert none is None and stacked_up_view(plain_in, None, plain_r).shape == (38, 16)
    assert stacked_up_view(plain_in.half(), None, plain_r) is None   # dtypes differ
