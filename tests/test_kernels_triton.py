"""Triton kernels (decode and grouped paths) under TRITON_INTERPRET=1 against the torch reference.

Fresh random inputs per case, relative error in fp64, NaN never passes, output buffer poisoned
first so every element must be written; tau from all experts to one expert, tokens that pick one
expert, experts that get no token, expert sizes that are not powers of two.
"""

import os

# The kernels are built as interpreted functions when their modules are imported with this set
# (it stays set: Triton reads it at launch too; vLLM subprocesses get an environment without it).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import count_descriptors, with_pdl, with_prefetch  # noqa: E402

from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402
from d2dmoe_kernels.expert_decode import decode_experts  # noqa: E402
from d2dmoe_kernels.expert_decode_balanced import balanced_decode_experts  # noqa: E402
from d2dmoe_kernels.expert_decode_fused import fused_decode_experts  # noqa: E402
from d2dmoe_kernels.expert_decode_persistent import persistent_decode_experts  # noqa: E402
from d2dmoe_kernels.expert_grouped import grouped_experts  # noqa: E402
from d2dmoe_kernels.expert_masked import masked_dense_experts  # noqa: E402
from d2dmoe_kernels.reference import (  # noqa: E402
    dynamic_k_experts_reference,
    router_scores,
    select_experts,
    selection_rule,
)
from d2dmoe_kernels.router import fused_router  # noqa: E402
from d2dmoe_kernels.router_tail import router_hidden, router_tail  # noqa: E402
from d2dmoe_kernels.triton_common import INTERPRET  # noqa: E402

assert INTERPRET, "a kernel module was imported before TRITON_INTERPRET was set"

DECODE = dict(max_tokens=32, BLOCK_E=16, BLOCK_K=32, BLOCK_N=32, BLOCK_J=16, SPLIT=3, num_warps=4)
GROUPED = dict(BLOCK_T_SCAN=16, BM=16, BN_UP=16, BK_UP=32, BN_DOWN=32, BK_DOWN=16, programs_per_sm=1,
               num_warps=4, num_stages=2, BLOCK_T_REDUCE=16, BLOCK_N_REDUCE=32, chunk_tokens=48)
BALANCED = dict(max_tokens=4, programs_per_sm=1, BLOCK_J=16, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=2,
                BLOCK_N_REDUCE=32)
FUSED = dict(max_tokens=4, BLOCK_J=16, BLOCK_K=32, BLOCK_N=32, num_warps=4, num_stages=2, BLOCK_N_REDUCE=32)
ROUTER = dict(max_tokens=8, BLOCK_W=16, BLOCK_K=32, num_warps=4, tail_max_tokens=0, TAIL_BLOCK_T=16, TAIL_BLOCK_E=16,
              TAIL_BLOCK_W=16)
MASKED = dict(min_tokens=5, max_tokens=0, fallback_max_tokens=0, own_router=False, BLOCK_T=16, BLOCK_J=16, BLOCK_K=32,
              ROUTER_BLOCK_E=16, ROUTER_BLOCK_W=16, num_warps=4, num_stages=2)
PERSISTENT = dict(max_tokens=4, HIDDEN_BLOCK_W=16, HIDDEN_BLOCK_K=32, TAIL_BLOCK_W=16, BLOCK_R=16, BLOCK_K=32,
                  BLOCK_N=32, BLOCK_N_REDUCE=16, REDUCE_BLOCK_S=4, num_warps=4, num_stages=2)
SMALL = dict(router=ROUTER, fused=FUSED, decode=dict(DECODE, max_tokens=8), grouped=GROUPED, masked=MASKED,
             balanced=dict(BALANCED, max_tokens=0))


def masked_scores(x, scores, ref_val, factor, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, out=None):
    """The masked path with the decode/grouped launchers' signature (selection from given scores)."""
    res = masked_dense_experts(x, w_in, w_up, w_out, b_in, b_out, activation, counters, cfg, "scores",
                               scores=scores, ref=ref_val, tau=factor)
    if out is None:
        return res
    out.copy_(res)
    return out


PATHS = {  # path: (launcher, config, tokens)
    "masked": (masked_scores, MASKED, 37),
    "fused": (fused_decode_experts, FUSED, 3),
    "fused, 8-slot reduce steps": (fused_decode_experts, dict(FUSED, REDUCE_BLOCK_S=8), 3),  # several steps per token
    "fused, TMA": (fused_decode_experts, dict(FUSED, TMA=1), 3),  # tensor descriptors (pointer loads where e % 16)
    "balanced": (balanced_decode_experts, BALANCED, 3),
    "persistent": (persistent_decode_experts, PERSISTENT, 3),
    "persistent, one token": (persistent_decode_experts, PERSISTENT, 1),
    "persistent, 32-row slices": (persistent_decode_experts, dict(PERSISTENT, BLOCK_R=32), 2),
    "decode": (decode_experts, DECODE, 5),
    "grouped": (grouped_experts, GROUPED, 61),
}


def layer(E, ES, D, gated, seed, d_out=None, biases=None):
    """Expert weights x [T, D] -> [T, d_out] (d_out = D unless given: attention projections as experts);
    biases default to the plain (GPT-2) layout, gated experts may take them too."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    d_out = D if d_out is None else d_out
    biases = not gated if biases is None else biases
    return dict(w_in=r(E, ES, D) / D**0.5, w_up=r(E, ES, D) / D**0.5 if gated else None,
                w_out=r(E, ES, d_out) / (E * ES) ** 0.5, b_in=r(E, ES) * 0.1 if biases else None,
                b_out=r(d_out) * 0.1 if biases else None)


def reference(x, mask, w, activation):
    f64 = {k: None if v is None else v.double() for k, v in w.items()}
    return dynamic_k_experts_reference(x.double(), mask, **f64, activation=activation)


def check(out, ref, tol=1e-5):
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    assert not torch.isnan(out).any(), "NaN (unwritten or invalid) output"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("gated,activation,ES", [(False, "gelu_tanh", 32), (True, "relu", 16), (True, "gelu_tanh", 48),
                                                 (False, "gelu", 24)])
@pytest.mark.parametrize("tau", [0.0, 0.4, 0.8, 1.0])
def test_kernel_matches_reference(path, gated, activation, ES, tau):
    seed = hash((path, gated, activation, ES, tau)) % 10_000
    E, D = 7, 40
    launch, cfg, T = PATHS[path]
    w = layer(E, ES, D, gated, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, D, generator=g)
    scores = torch.rand(T, E, generator=g) ** 4          # skewed: at high tau most tokens keep one expert
    ref_val, factor = selection_rule(scores, tau)
    mask = select_experts(scores, tau)
    if tau == 1.0:
        assert (mask.sum(-1) == 1).all()
    counters = torch.zeros(2, dtype=torch.int64)
    out = torch.full_like(x, float("nan"))               # poisoned: every element must be written
    launch(x, scores, ref_val, factor, *w.values(), activation, counters, cfg, out=out)
    check(out, reference(x, mask, w, activation))
    assert counters.tolist() == [T, int(mask.sum())]


@pytest.mark.parametrize("path", list(PATHS))
def test_idle_experts_and_single_expert_tokens(path):
    E, ES, D = 9, 16, 32
    launch, cfg, T = PATHS[path]
    w = layer(E, ES, D, True, 3)
    x = torch.randn(T, D)
    scores = torch.full((T, E), 0.01)
    scores[:, 4] = 1.0                                    # every token: expert 4 only...
    scores[::3, 7] = 0.9                                  # ...every third also expert 7; 7 of 9 experts idle
    counters = torch.zeros(2, dtype=torch.int64)
    ref_val, factor = selection_rule(scores, 0.5)
    out = launch(x, scores, ref_val, factor, *w.values(), "relu", counters, cfg)
    mask = select_experts(scores, 0.5)
    assert mask.sum(0).tolist() == [0, 0, 0, 0, T, 0, 0, len(range(0, T, 3)), 0]
    check(out, reference(x, mask, w, "relu"))
    assert counters.tolist() == [T, int(mask.sum())]


@pytest.mark.parametrize("block_j,ES", [(32, 16), (64, 16), (64, 24)])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_masked_tiles_spanning_small_experts(block_j, ES, tau):
    """Masked path on given scores: tiles run over the E*e neurons end to end, so one tile holds
    several small experts (or parts of two); selection per (token, neuron), pairs counted once per
    expert, tiles whose experts no token chose write zeros (experts 0-2 idle at tau > 0)."""
    E, D, T = 11, 32, 21
    w = layer(E, ES, D, False, block_j + ES)
    x = torch.randn(T, D)
    scores = torch.rand(T, E) ** 4
    scores[:, :3] = 0.0
    ref_val, factor = selection_rule(scores, tau)
    mask = select_experts(scores, tau)  # tau = 0: every expert, the idle ones too
    counters = torch.zeros(2, dtype=torch.int64)
    out = torch.full((T, D), float("nan"))
    masked_scores(x, scores, ref_val, factor, *w.values(), "gelu", counters, dict(MASKED, BLOCK_J=block_j), out=out)
    check(out, reference(x, mask, w, "gelu"))
    assert counters.tolist() == [T, int(mask.sum())]


def router(D, E, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(width, D, generator=g) / D**0.5, torch.randn(E, width, generator=g) / width**0.5


@pytest.mark.parametrize("T,D,W,E", [(1, 64, 32, 8), (5, 96, 48, 20), (8, 64, 128, 70)])
def test_fused_router_matches_torch_and_resets_its_semaphore(T, D, W, E):
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, W)
    counters = torch.zeros(3, dtype=torch.int64)
    want = router_scores(x.double(), r_in.double(), r_out.double())
    for _ in range(2):  # the second call only works if the first left the semaphore at 0
        scores, rowmax = fused_router(x, r_in, r_out, counters[2:3], ROUTER)
        check(scores, want)
        check(rowmax, want.amax(-1))
        assert counters.tolist() == [0, 0, 0]


D_OUTS = [None, 24, 72]  # d_out = d_in (32), below and above it (attention projections as experts)


@pytest.mark.parametrize("d_out", D_OUTS)
@pytest.mark.parametrize("T", [3, 6, 30])
def test_top_k_through_kernels(T, d_out):
    E, ES, D = 8, 16, 32
    w = layer(E, ES, D, False, 5, d_out)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E)
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, 0.0, 3, *w.values(), "relu", counters, SMALL)
    mask = select_experts(router_scores(x, r_in, r_out), 0.0, top_k=3)
    assert (mask.sum(-1) == 3).all()
    check(out, reference(x, mask, w, "relu"))
    assert counters.tolist() == [T, 3 * T, 0]


@pytest.mark.parametrize("d_out", D_OUTS)
@pytest.mark.parametrize("T", [2, 6, 30])
def test_dispatch_dynamic_k(T, d_out):
    """Router (fused for T <= 8), selection and the path chosen by T, through the op's CUDA body."""
    E, ES, D = 8, 16, 32
    w = layer(E, ES, D, True, 7, d_out)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=T)
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, 0.6, 0, *w.values(), "gelu_tanh", counters, SMALL)
    mask = select_experts(router_scores(x, r_in, r_out), 0.6)
    assert 0 < int(mask.sum()) < T * E
    check(out, reference(x, mask, w, "gelu_tanh"))
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("tail", [0, 64])  # the router: torch, or first layer + the Triton tail's sum reference
@pytest.mark.parametrize("own_router", [False, True])
@pytest.mark.parametrize("tau", [0.0, 0.04, 0.12, 1.0])
@pytest.mark.parametrize("T", [1, 3, 9, 30])  # fused decode, masked, grouped (SMALL: masked up to 64 with own_router)
def test_dispatch_selects_against_the_sum(T, tau, own_router, tail):
    """reference "sum" on every path, including the ones whose kernels take the row max themselves (fused
    router, own_router): those must not run, or the selection would be the max rule's."""
    E, ES, D = 8, 16, 32
    w = layer(E, ES, D, True, 41)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=50 + T)
    cfg = dict(SMALL, router=dict(ROUTER, tail_max_tokens=tail), fused=dict(FUSED, own_router=own_router),
               masked=dict(MASKED, max_tokens=16, own_router=own_router))
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, tau, 0, *w.values(), "gelu_tanh", counters, cfg, reference="sum")
    scores = router_scores(x, r_in, r_out)
    mask = select_experts(scores, tau, reference="sum")
    if tau == 1.0:
        assert (mask.sum(-1) == 1).all()
    if tau == 0.12:
        assert int(mask.sum()) < int(select_experts(scores, tau).sum())  # the max rule would run more experts
    check(out, reference(x, mask, w, "gelu_tanh"))
    assert counters.tolist() == [T, int(mask.sum()), 0]


def test_device_choice_predicate_and_eager_rule():
    """The path chosen on the device (CUDA graphs only): its predicate is a device tensor (no host sync) that
    counts the pairs the selection rule runs; off the GPU / outside a capture there is no graph to branch in,
    so a config that enables the choice computes what the host rule computes (the GPU suite checks the
    captured branches: test_device_choice_runs_the_path_the_selection_asks_for)."""
    from d2dmoe_kernels.dispatch import capturing_graph, conditional_nodes, executed_pairs_above

    scores = torch.tensor([[1.0, 0.95, 0.2, 0.1], [0.5, 1.0, 0.9, 0.0]])
    ref = scores.amax(-1)
    # 0.9 x the row max: 2 of row 0, 2 of row 1 -> 4 of 8 pairs
    pred = executed_pairs_above(scores, ref, 0.9, 0.4)
    assert isinstance(pred, torch.Tensor) and pred.dtype == torch.bool and pred.dim() == 0 and bool(pred)
    assert not bool(executed_pairs_above(scores, ref, 0.9, 0.5))     # 4 > 4 is false
    assert bool(executed_pairs_above(scores, ref, 0.0, 0.99))        # tau 0: all 8
    assert capturing_graph(torch.zeros(2, 4)) is None
    if torch.version.cuda is None:   # a CPU (or ROCm) build has no CUDA graph IF nodes
        assert conditional_nodes() is False
    E, ES, D, T = 8, 16, 32, 30
    w = layer(E, ES, D, True, 11)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=5)
    outs = []
    for cfg in (SMALL, dict(SMALL, gemm=dict(min_tokens=1, max_tokens=0, BLOCK_T=16, BLOCK_C=16, num_warps=4),
                              choice=dict(min_tokens=1, max_tokens=1 << 30, fraction=0.4))):
        outs.append(dynamic_k_experts_triton(x, r_in, r_out, 0.6, 0, *w.values(), "gelu_tanh",
                                             torch.zeros(3, dtype=torch.int64), cfg))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("T,balanced", [(2, False), (2, True), (6, False), (30, False)])
@pytest.mark.parametrize("tau", [0.0, 0.6])
def test_expert_shards_add_up(T, tau, balanced):
    """Tensor parallelism: each rank runs experts [offset, offset + E/tp) selected against the max
    over all E; the shards' outputs add up to the unsharded layer (paths chosen by T; at T = 2 the
    fused or the balanced decode kernel)."""
    E, ES, D, tp = 8, 16, 32, 2
    w = layer(E, ES, D, False, 13)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=T)
    cfg = dict(SMALL, balanced=dict(BALANCED, max_tokens=4 if balanced else 0))
    full = dynamic_k_experts_triton(x, r_in, r_out, tau, 0, *w.values(), "relu", torch.zeros(3, dtype=torch.int64), cfg)
    parts, pairs = [], 0
    for rank in range(tp):
        sl = slice(rank * E // tp, (rank + 1) * E // tp)
        counters = torch.zeros(3, dtype=torch.int64)
        parts.append(dynamic_k_experts_triton(
            x, r_in, r_out, tau, 0, w["w_in"][sl], None, w["w_out"][sl], w["b_in"][sl],
            w["b_out"] if rank == 0 else None, "relu", counters, cfg, expert_offset=sl.start))
        pairs += int(counters[1])
    check(sum(parts), full.double())
    assert pairs == int(select_experts(router_scores(x, r_in, r_out), tau).sum())


def test_dense_fallback_when_every_expert_runs():
    E, ES, D, T = 6, 16, 32, 12
    w = layer(E, ES, D, True, 9)
    x = torch.randn(T, D)
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, *router(D, E), 0.0, 0, *w.values(), "gelu_tanh", counters, SMALL)
    check(out, reference(x, torch.ones(T, E, dtype=torch.bool), w, "gelu_tanh"))
    assert counters.tolist() == [T, T * E, 0]


def test_grouped_chunks_match_one_pass():
    """Buffers are bounded by processing chunk_tokens at a time; results must not depend on it
    (up to the last bit: under the interpreter the tiles' products are numpy/BLAS matmuls, whose
    rounding differed in the last bit between tile contents on this CI host, 2026-12-01)."""
    E, ES, D, T = 5, 16, 32, 50
    w = layer(E, ES, D, False, 11)
    x, scores = torch.randn(T, D), torch.rand(T, E)
    ref_val, factor = selection_rule(scores, 0.5)
    outs = [grouped_experts(x, scores, ref_val, factor, *w.values(), "relu", torch.zeros(2, dtype=torch.int64),
                            dict(GROUPED, chunk_tokens=c)) for c in (7, 64)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("T,D,W,E", [(1, 64, 32, 8), (5, 96, 48, 20), (37, 64, 24, 70)])
@pytest.mark.parametrize("rowmax", [True, False])
def test_router_tail_matches_torch(T, D, W, E, rowmax):
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, W, seed=T)
    scores, rmax = router_tail(router_hidden(x, r_in), r_out, ROUTER, rowmax=rowmax)
    want = router_scores(x.double(), r_in.double(), r_out.double())
    check(scores, want)
    assert torch.equal(rmax, scores.amax(-1)) if rowmax else rmax is None


@pytest.mark.parametrize("T,D,W,E", [(1, 64, 32, 8), (5, 96, 48, 20), (37, 64, 24, 70)])
@pytest.mark.parametrize("tau", [0.0, 0.02, 0.1, 1.0])
def test_router_tail_sum_reference(T, D, W, E, tau):
    """sum_tau: the tail's second output is min(tau * sum_e R_e, max_e R_e) over its rounded scores (E over
    several expert blocks: 70 with blocks of 16), the "sum" rule's reference with factor 1."""
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, W, seed=T)
    scores, ref = router_tail(router_hidden(x, r_in), r_out, ROUTER, sum_tau=tau)
    want, factor = selection_rule(scores, tau, 0, "sum")
    assert factor == 1.0
    torch.testing.assert_close(ref, want, rtol=1e-6, atol=0.0)
    if tau == 1.0:
        assert torch.equal(ref, scores.amax(-1))
    with pytest.raises(ValueError, match="rowmax=True"):
        router_tail(router_hidden(x, r_in), r_out, ROUTER, rowmax=False, sum_tau=tau)


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("split_tail", [False, True])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("gated,d_out", [(True, None), (False, 72)])
def test_fused_with_router_tail(T, split_tail, gated, d_out, balanced):
    """cuBLAS router layer + Triton tail (row max in the tail, or expert blocks spread over programs
    and the decode kernel taking the row max) feeding the fused or the balanced decode kernel."""
    E, ES, D = 40, 16, 32
    w = layer(E, ES, D, gated, 31, d_out)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=11)
    cfg = dict(SMALL, router=dict(ROUTER, max_tokens=0, tail_max_tokens=64), fused=dict(FUSED, split_tail=split_tail),
               balanced=dict(BALANCED, max_tokens=4 if balanced else 0))
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, 0.5, 0, *w.values(), "gelu_tanh", counters, cfg)
    mask = select_experts(router_scores(x, r_in, r_out), 0.5)
    check(out, reference(x, mask, w, "gelu_tanh"))
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("path", ["fused", "masked"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("gated,d_out", [(False, None), (True, None), (True, 24), (True, 72)])
def test_in_kernel_router(path, tau, gated, d_out, full):
    """own_router: the expert kernel computes the router's tail itself; same result as the
    reference on the torch router's selection, same counters; tau = 1 keeps one expert per token.
    d_out != d_in: gated experts with biases (attention projections as experts)."""
    E, ES, D = 9, 16, 32
    T = 3 if path == "fused" else 21
    w = layer(E, ES, D, gated, 17, d_out, biases=True if d_out else None)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=5)
    cfg = dict(SMALL, fused=dict(FUSED, own_router=True, full_router=full),
               masked=dict(MASKED, max_tokens=64, own_router=True, full_router=full))
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, tau, 0, *w.values(), "relu", counters, cfg)
    mask = select_experts(router_scores(x, r_in, r_out), tau)
    if tau == 1.0:
        assert (mask.sum(-1) == 1).all()
    check(out, reference(x, mask, w, "relu"))
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("tau", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("T,gated,d_out,ES", [(1, True, None, 16), (1, False, None, 24), (2, True, 24, 16),
                                              (3, False, 72, 32), (4, True, None, 48)])
def test_persistent_decode_through_dispatch(T, gated, d_out, ES, tau):
    """The one-launch decode path as dispatch takes it (own router, no override): the router's first
    layer spread over the programs, every program's own scores and selection, the selected neurons
    cut into 16-row slices round robin (4 programs under the interpreter: a program takes several
    slices, slices span experts, some programs get none at tau = 1), the partials reduced in order;
    matches the torch router's selection."""
    E, D = 9, 32
    w = layer(E, ES, D, gated, 23 + T, d_out, biases=True if d_out else None)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=9)
    cfg = dict(SMALL, persistent=PERSISTENT)
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, tau, 0, *w.values(), "gelu_tanh", counters, cfg)
    mask = select_experts(router_scores(x, r_in, r_out), tau)
    if tau == 1.0:
        assert (mask.sum(-1) == 1).all()
    check(out, reference(x, mask, w, "gelu_tanh"))
    assert counters.tolist() == [T, int(mask.sum()), 0]


def test_persistent_decode_only_where_it_applies(monkeypatch):
    """Dispatch takes the one-launch path up to its max_tokens and only for dynamic-k routing on whole
    (unsharded) layers: above it, for top-k and for a shard the other decode paths run."""
    import d2dmoe_kernels.dispatch as dispatch

    calls = []
    real = dispatch.persistent_decode_experts
    monkeypatch.setattr(dispatch, "persistent_decode_experts", lambda *a, **k: calls.append(1) or real(*a, **k))
    E, ES, D = 6, 16, 32
    w = layer(E, ES, D, True, 5)
    r_in, r_out = router(D, E, seed=3)
    cfg = dict(SMALL, persistent=dict(PERSISTENT, max_tokens=2))
    counters = torch.zeros(3, dtype=torch.int64)
    for T, top_k, taken in [(1, 0, True), (2, 0, True), (3, 0, False), (1, 2, False)]:
        calls.clear()
        x = torch.randn(T, D)
        out = dynamic_k_experts_triton(x, r_in, r_out, 0.5, top_k, *w.values(), "relu", counters, cfg)
        check(out, reference(x, select_experts(router_scores(x, r_in, r_out), 0.5, top_k), w, "relu"))
        assert bool(calls) == taken, (T, top_k)
    calls.clear()
    shard = {k: (None if v is None else v[:3]) if k.startswith(("w_", "b_in")) else v for k, v in w.items()}
    dynamic_k_experts_triton(torch.randn(1, D), r_in, r_out, 0.5, 0, *shard.values(), "relu", counters, cfg)
    assert not calls


@pytest.mark.parametrize("T", [21, 30])
def test_masked_token_tiers_choose_where_the_router_runs(T):
    """A ``by_tokens`` tier may move the router out of the masked kernel (large T: router GEMM + tail,
    then tiles spanning small experts): same result and counters on both sides of the bound."""
    E, ES, D = 10, 16, 32
    w = layer(E, ES, D, False, 41)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=7)
    tiers = [[24, dict(own_router=True)], [1 << 30, dict(own_router=False, BLOCK_J=64)]]
    cfg = dict(SMALL, router=dict(ROUTER, max_tokens=0, tail_max_tokens=64),
               masked=dict(MASKED, max_tokens=64, by_tokens=tiers))
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, 0.5, 0, *w.values(), "relu", counters, cfg)
    mask = select_experts(router_scores(x, r_in, r_out), 0.5)
    check(out, reference(x, mask, w, "relu"))
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("T", [1, 2, 3])
def test_fused_token_tiers_pick_the_blocks(T, monkeypatch):
    """``by_tokens`` tiers of the fused config: the tier covering T sets the blocks the kernel gets
    (max_tokens stays the path's), and the result matches the reference with any of them."""
    import d2dmoe_kernels.dispatch as dispatch

    E, ES, D = 6, 32, 32
    w = layer(E, ES, D, True, 43)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=11)
    tiers = [[1, dict(BLOCK_K=16)], [2, dict(BLOCK_J=32, num_stages=3)]]
    cfg = dict(SMALL, fused=dict(FUSED, by_tokens=tiers))
    seen = []
    real = dispatch.fused_decode_experts
    monkeypatch.setattr(dispatch, "fused_decode_experts", lambda *a, **k: seen.append(a[11]) or real(*a, **k))
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, 0.5, 0, *w.values(), "gelu_tanh", counters, cfg)
    check(out, reference(x, select_experts(router_scores(x, r_in, r_out), 0.5), w, "gelu_tanh"))
    (used,) = seen
    want = {1: (16, 16, 2), 2: (32, 32, 3), 3: (16, 32, 2)}[T]            # (BLOCK_J, BLOCK_K, num_stages)
    assert (used["BLOCK_J"], used["BLOCK_K"], used["num_stages"]) == want and used["max_tokens"] == 4


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("path", ["fused", "masked"])
def test_in_kernel_router_with_override_and_shards(path, full):
    """Benchmarks' controlled routing (router paid, given scores select) and tensor-parallel shards
    (local experts, row max over all router experts) through the in-kernel router."""
    E, ES, D, tp = 8, 16, 32, 2
    T = 3 if path == "fused" else 19
    w = layer(E, ES, D, False, 23)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=9)
    cfg = dict(SMALL, fused=dict(FUSED, own_router=True, full_router=full),
               masked=dict(MASKED, max_tokens=64, own_router=True, full_router=full))
    scores = torch.rand(T, E) ** 3
    routing = (scores, *selection_rule(scores, 0.6))
    out = dynamic_k_experts_triton(x, r_in, r_out, 0.6, 0, *w.values(), "relu", torch.zeros(3, dtype=torch.int64),
                                   cfg, route_override=routing)
    check(out, reference(x, select_experts(scores, 0.6), w, "relu"))
    parts, pairs = [], 0
    for rank in range(tp):
        sl = slice(rank * E // tp, (rank + 1) * E // tp)
        counters = torch.zeros(3, dtype=torch.int64)
        parts.append(dynamic_k_experts_triton(
            x, r_in, r_out, 0.6, 0, w["w_in"][sl], None, w["w_out"][sl], w["b_in"][sl],
            w["b_out"] if rank == 0 else None, "relu", counters, cfg, expert_offset=sl.start))
        pairs += int(counters[1])
    mask = select_experts(router_scores(x, r_in, r_out), 0.6)
    check(sum(parts), reference(x, mask, w, "relu"))
    assert pairs == int(mask.sum())


@pytest.mark.parametrize("T", [1, 6, 40])
def test_masked_dense_fallback(T):
    """tau = 0 at small T: the masked kernel with every expert selected (no router), counters on the device."""
    E, ES, D = 6, 16, 32
    w = layer(E, ES, D, True, 29)
    x = torch.randn(T, D)
    counters = torch.zeros(3, dtype=torch.int64)
    cfg = dict(SMALL, masked=dict(MASKED, fallback_max_tokens=64))
    out = dynamic_k_experts_triton(x, *router(D, E), 0.0, 0, *w.values(), "gelu_tanh", counters, cfg)
    check(out, reference(x, torch.ones(T, E, dtype=torch.bool), w, "gelu_tanh"))
    assert counters.tolist() == [T, T * E, 0]


@pytest.mark.parametrize("T", [1, 3])
def test_prefetch_config_is_ignored_off_the_gpu(T):
    """A device file may switch on the L2 prefetches (inline PTX, sm_90); on the CPU / interpreter the same
    config runs the kernels without them and gives the same result; misaligned weights switch them off."""
    from d2dmoe_kernels.triton_common import prefetch_ok

    E, ES, D = 8, 16, 32
    w = layer(E, ES, D, True, 23)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=T)
    base = dict(SMALL, router=dict(ROUTER, max_tokens=0, tail_max_tokens=64, hidden_max_tokens=64, HIDDEN_BLOCK_K=32))
    pre = with_prefetch(base)
    assert pre["fused"]["PREFETCH"] == 3 and pre["router"]["HIDDEN_PREFETCH"] == 1
    assert prefetch_ok(3, x, w["w_in"]) == 0 and prefetch_ok(0, x) == 0
    outs = [dynamic_k_experts_triton(x, r_in, r_out, 0.6, 0, *w.values(), "gelu_tanh", torch.zeros(3, dtype=torch.int64),
                                     cfg) for cfg in (base, pre)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_router_keys_per_shape_reach_the_router_launches(monkeypatch):
    """``router@d<D>`` / ``router@d<D>e<ES>`` in a config file change the router keys of that shape only
    (the H200 file prefetches the router's weights at d2048 alone)."""
    import d2dmoe_kernels.dispatch as dispatch

    seen = []
    real = dispatch.router_hidden
    monkeypatch.setattr(dispatch, "router_hidden", lambda x, w1, cfg: seen.append(dict(cfg)) or real(x, w1, cfg))
    E, ES, D = 8, 16, 32
    w = layer(E, ES, D, True, 24)
    x = torch.randn(1, D)
    r_in, r_out = router(D, E, seed=5)
    base = dict(SMALL, router=dict(ROUTER, max_tokens=0, tail_max_tokens=64, hidden_max_tokens=64, HIDDEN_BLOCK_K=32))
    for cfg, want in ((base, None), ({**base, f"router@d{D}": {"HIDDEN_PREFETCH": 1}}, 1),
                      ({**base, f"router@d{D}e{ES}": {"HIDDEN_PREFETCH": 2}}, 2),
                      ({**base, f"router@d{D * 2}": {"HIDDEN_PREFETCH": 1}}, None)):
        seen.clear()
        dynamic_k_experts_triton(x, r_in, r_out, 0.6, 0, *w.values(), "gelu_tanh", torch.zeros(3, dtype=torch.int64), cfg)
        assert seen and all(c.get("HIDDEN_PREFETCH") == want for c in seen), (want, seen)


@pytest.mark.parametrize("T", [1, 8])  # fused decode after the router tail; masked after the tail
def test_pdl_config_is_ignored_off_the_gpu(T):
    """A device file may switch on programmatic dependent launch; on the CPU / interpreter the same config
    must run the same kernels without it (the interpreter knows no ``launch_pdl``) and give the same result."""
    from d2dmoe_kernels.triton_common import pdl_launch, use_pdl

    E, ES, D = 8, 16, 32
    w = layer(E, ES, D, True, 21)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=T)
    base = dict(SMALL, router=dict(ROUTER, max_tokens=0, tail_max_tokens=64, hidden_max_tokens=64, HIDDEN_BLOCK_K=32),
                masked=dict(MASKED, max_tokens=64))
    pdl = with_pdl(base)
    assert not use_pdl(pdl["fused"], x) and pdl_launch(False) == {}
    outs = [dynamic_k_experts_triton(x, r_in, r_out, 0.6, 0, *w.values(), "gelu_tanh", torch.zeros(3, dtype=torch.int64),
                                     cfg) for cfg in (base, pdl)]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    scores, rowmax = router_tail(router_hidden(x, r_in, base["router"]), r_out, base["router"])
    check(outs[1], reference(x, scores >= 0.6 * rowmax[:, None], w, "gelu_tanh"))


@pytest.mark.parametrize("T,D,W", [(1, 64, 32), (5, 96, 48), (37, 64, 24), (70, 40, 16)])  # 70: two token blocks
@pytest.mark.parametrize("rows", [16, 64])  # token rows per program (HIDDEN_BLOCK_T)
def test_router_hidden_triton_matches_torch(T, D, W, rows, monkeypatch):
    """The Triton first layer (T <= hidden_max_tokens) against the fp64 product, with cuBLAS out of
    reach so a silent fallback cannot pass; cuBLAS above the bound."""
    x = torch.randn(T, D)
    r_in, _ = router(D, 4, W, seed=T)
    cfg = dict(ROUTER, hidden_max_tokens=128, HIDDEN_BLOCK_K=32, HIDDEN_BLOCK_T=rows)
    with monkeypatch.context() as m:
        m.setattr(torch.nn.functional, "linear", None)
        hid = router_hidden(x, r_in, cfg)
    check(hid, x.double() @ r_in.double().t())
    torch.testing.assert_close(router_hidden(x, r_in, dict(cfg, hidden_max_tokens=T - 1)), x @ r_in.t())


@pytest.mark.parametrize("own_router", [False, True])
@pytest.mark.parametrize("T", [1, 3, 9])  # fused decode (router tail outside it, or inside), masked
def test_dispatch_with_triton_router_hidden(T, own_router):
    E, ES, D = 8, 16, 32
    w = layer(E, ES, D, True, 23)
    x = torch.randn(T, D)
    r_in, r_out = router(D, E, seed=30 + T)
    cfg = dict(SMALL, router=dict(ROUTER, max_tokens=0, tail_max_tokens=64, hidden_max_tokens=64, HIDDEN_BLOCK_K=32),
               fused=dict(FUSED, own_router=own_router), masked=dict(MASKED, max_tokens=64, own_router=own_router))
    counters = torch.zeros(3, dtype=torch.int64)
    out = dynamic_k_experts_triton(x, r_in, r_out, 0.6, 0, *w.values(), "gelu_tanh", counters, cfg)
    scores, rowmax = router_tail(router_hidden(x, r_in, cfg["router"]), r_out, cfg["router"])  # the op's own scores
    mask = scores >= 0.6 * rowmax[:, None]
    assert 0 < int(mask.sum()) < T * E
    check(out, reference(x, mask, w, "gelu_tanh"))
    assert counters.tolist() == [T, int(mask.sum()), 0]


@pytest.mark.parametrize("d_out", D_OUTS)
@pytest.mark.parametrize("gated,ES,descriptors", [(True, 32, 3), (False, 32, 2), (True, 24, 0)])
def test_fused_tma_reads_through_descriptors(gated, ES, descriptors, d_out, monkeypatch):
    """With ``TMA`` the fused kernel gets its weights as tensor descriptors (w_in, w_up if gated, w_out;
    none where e is no multiple of the slice: pointer loads), and matches the reference either way."""
    made = count_descriptors(monkeypatch)
    E, D, T = 6, 40, 3
    w = layer(E, ES, D, gated, 11, d_out)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(T, D, generator=g)
    scores = torch.rand(T, E, generator=g) ** 4
    ref_val, factor = selection_rule(scores, 0.5)
    counters = torch.zeros(2, dtype=torch.int64)
    out = fused_decode_experts(x, scores, ref_val, factor, *w.values(), "relu", counters, dict(FUSED, TMA=1))
    assert len(made) == descriptors
    assert all(rows == FUSED["BLOCK_J"] for rows, _ in made)
    check(out, reference(x, select_experts(scores, 0.5), w, "relu"))
