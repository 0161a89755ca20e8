"""Kernels that run outside vLLM's CUDA graphs do not compile again when the token count changes.

Triton compiles a kernel once per value class of each int argument it specializes (1, a multiple of 16,
other). Prefill chunks above the largest captured size, and every step in eager mode, run at whatever
token count the scheduler made, so a kernel that specializes T (or anything that follows T) compiles
again in the middle of serving: the H100 serve run of session 57 (vLLM's JIT monitor) caught the grouped
path's six kernels doing so at batch 256, inside timed runs. Here the dispatch runs every large-T path
(masked with given scores and with the router inside, grouped over several chunks, the gemm path, the
router's Triton first layer and tail) at token counts of each class under the interpreter, records
every launch, and requires each int argument that changed with T to be one its kernel leaves
unspecialized (the decorator's ``do_not_specialize``, which the interpreter keeps as Triton does), and
every constexpr to stay put (the grouped scan's block once followed each pass's token count). Token-count
tiers of a device config (``by_tokens``) do select other constexprs on purpose; the test's config has none.
"""

import inspect
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from test_kernels_gemm import GEMM, stacked_layer  # noqa: E402
from test_kernels_triton import MASKED, ROUTER, SMALL, check, layer, reference, router  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402
from d2dmoe_kernels.reference import router_scores, select_experts  # noqa: E402

TOKENS = (96, 101, 133, 160)   # 6 x 16 and other; in passes of 48 tokens (the grouped path) 48 + 48 (+ 5, + 37,
                               # + 16): every class of T and of NTB, passes of every size; all above the Triton
                               # router first layer's smallest-T tiers (T < 64: inside captured graphs)
ROUTER_KERNELS = dict(ROUTER, max_tokens=0, hidden_max_tokens=1 << 30, tail_max_tokens=1 << 30)
ROUTER_TRITON = {"_router_hidden_kernel", "_router_tail_kernel"}
GROUPED = {"_count_kernel", "_scan_kernel", "_fill_kernel", "_grouped_up_kernel", "_grouped_down_kernel",
           "_gather_reduce_kernel"}
PATHS = {  # path: (config, the kernels it launches)
    "masked, given scores": (dict(SMALL, router=ROUTER_KERNELS, masked=dict(MASKED, max_tokens=1 << 30)),
                             ROUTER_TRITON | {"_masked_up_kernel"}),
    "masked, router inside": (dict(SMALL, router=ROUTER_KERNELS,
                                   masked=dict(MASKED, max_tokens=1 << 30, own_router=True)),
                              {"_router_hidden_kernel", "_masked_up_kernel"}),
    "grouped": (dict(SMALL, router=ROUTER_KERNELS), ROUTER_TRITON | GROUPED),
    "gemm": (dict(SMALL, router=ROUTER_KERNELS, gemm=dict(GEMM, max_tokens=1 << 30)),   # router's first layer in
             {"_router_tail_kernel", "_select_act_kernel"}),                            # the stacked GEMM
}
LARGE_T_KERNELS = set().union(*(kernels for _, kernels in PATHS.values()))


@pytest.fixture
def launches(monkeypatch):
    """Every kernel launch as (kernel, its int arguments by name, its constexpr arguments by name)."""
    seen = []
    real = InterpretedFunction.run

    def run(self, *args, **kwargs):
        sig = inspect.signature(self.fn)
        bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        const = {name: v for name, v in bound.arguments.items() if sig.parameters[name].annotation is tl.constexpr}
        ints = {name: v for name, v in bound.arguments.items()
                if isinstance(v, int) and not isinstance(v, bool) and name not in const}
        seen.append((self, ints, const))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", run)
    return seen


def unspecialized(kernel) -> set:
    return set(kernel.kwargs.get("do_not_specialize") or ())


@pytest.mark.parametrize("path", list(PATHS))
def test_token_counts_never_select_a_new_compile(path, launches):
    cfg, expected = PATHS[path]
    E, ES, D = 8, 16, 32
    if path == "gemm":   # the plugin's one-buffer [w_in; w_up; router_in] layout, which the gemm path needs
        w, r_in, r_out = stacked_layer(E, ES, D, 24, True, False, 3)
    else:
        w, (r_in, r_out) = layer(E, ES, D, True, 3), router(D, E, seed=3)
    values, consts = {}, {}   # kernel -> argument -> values seen (int arguments; constexprs)
    for T in TOKENS:
        x = torch.randn(T, D)
        launches.clear()
        out = dynamic_k_experts_triton(x, r_in, r_out, 0.6, 0, *w.values(), "gelu_tanh",
                                       torch.zeros(3, dtype=torch.int64), cfg)
        mask = select_experts(router_scores(x, r_in, r_out), 0.6)
        check(out, reference(x, mask, w, "gelu_tanh"))   # the paths still compute the layer
        for kernel, ints, const in launches:
            for name, v in ints.items():
                values.setdefault(kernel, {}).setdefault(name, set()).add(v)
            for name, v in const.items():
                consts.setdefault(kernel, {}).setdefault(name, set()).add(repr(v))
    assert {k.fn.__name__ for k in values} == expected
    for kernel, args in values.items():
        varying = {name for name, vs in args.items() if len(vs) > 1}
        assert varying, (kernel.fn.__name__, "ran at one token count only: the test did not vary T")
        left = varying - unspecialized(kernel)
        assert not left, f"{kernel.fn.__name__} specializes {sorted(left)}, which follow T: a new T compiles it again"
        moved = {name: vs for name, vs in consts[kernel].items() if len(vs) > 1}
        assert not moved, f"{kernel.fn.__name__}'s constexprs {moved} follow T: a new T compiles it again"


def test_every_large_t_kernel_was_checked():
    """The paths above reach every kernel of the large-T modules (a new or renamed one must join the check)."""
    import d2dmoe_kernels.expert_grouped as grouped
    import d2dmoe_kernels.expert_masked as masked
    import d2dmoe_kernels.expert_masked_gemm as gemm
    import d2dmoe_kernels.router_tail as tail

    found = {name for mod in (grouped, masked, gemm, tail) for name, obj in vars(mod).items()
             if isinstance(obj, InterpretedFunction) and name.endswith("_kernel")}
    assert found == LARGE_T_KERNELS
    for mod in (grouped, masked, gemm, tail):
        for name in LARGE_T_KERNELS & set(vars(mod)):
            assert "T" in unspecialized(getattr(mod, name)) or "NTB" in unspecialized(getattr(mod, name))
