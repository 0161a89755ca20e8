"""The selection rule, the CPU op (skips unselected experts) and the masked torch reference agree."""

from pathlib import Path

import pytest
import torch

import d2dmoe_kernels.op  # noqa: F401
from d2dmoe_kernels import dynamic_k_experts_reference, router_scores, select_experts
from d2dmoe_kernels.cpu import dynamic_k_experts_cpu

TAUS = [0.0, 0.3, 0.6, 0.9, 1.0]


def make_layer(E, e, d, gated, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float32).to(dtype)  # noqa: E731
    return dict(w_in=r(E, e, d) / d**0.5, w_up=r(E, e, d) / d**0.5 if gated else None, w_out=r(E, e, d) / (E * e) ** 0.5,
                b_in=None if gated else r(E, e) * 0.1, b_out=None if gated else r(d) * 0.1)


def rel_err(a, b):
    assert not torch.isnan(a).any(), "NaN in output"
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_selection_rule():
    s = torch.tensor([[1.0, 0.5, 0.2, 0.9], [0.0, 0.0, 0.0, 0.0], [0.3, 3.0, 2.9, 0.1]])
    assert select_experts(s, 0.0).all()                       # tau = 0: every expert
    m = select_experts(s, 1.0)                                # tau = 1: only the arg-max (and ties)
    assert m.tolist() == [[True, False, False, False], [True] * 4, [False, True, False, False]]
    assert select_experts(s, 0.5).tolist()[0] == [True, True, False, True]
    assert select_experts(s, 0.0, top_k=2).sum(-1).tolist() == [2, 4, 2]   # ties with the k-th score also run
    assert select_experts(s, 0.0, top_k=2)[2].tolist() == [False, True, True, False]


def test_selection_rule_against_the_sum():
    """reference "sum": e runs iff R_e >= tau * sum_e R_e, or it is the arg-max; tau 0 runs all, tau 1 one."""
    s = torch.tensor([[1.0, 0.5, 0.2, 0.9], [0.0, 0.0, 0.0, 0.0], [0.3, 3.0, 2.9, 0.1], [1.0, 1.0, 1.0, 1.0]])
    assert select_experts(s, 0.0, reference="sum").all()
    assert select_experts(s, 1.0, reference="sum").tolist() == [[True, False, False, False], [True] * 4,
                                                                [False, True, False, False], [True] * 4]
    assert select_experts(s, 0.3, reference="sum").tolist() == [[True, False, False, True], [True] * 4,
                                                                [False, True, True, False], [True] * 4]  # ties with the arg-max run
    assert select_experts(s, 0.34, reference="sum").tolist()[0] == [True, False, False, True]   # 0.9 >= 0.34 * 2.6
    assert select_experts(s, 0.35, reference="sum").tolist()[0] == [True, False, False, False]  # 0.9 < 0.35 * 2.6
    g = torch.Generator().manual_seed(3)
    r = torch.rand(200, 16, generator=g) ** 3
    for tau in (0.02, 0.05, 0.1, 0.3):   # fewer experts than max at the same tau; the arg-max always runs
        m = select_experts(r, tau, reference="sum")
        assert m[torch.arange(200), r.argmax(-1)].all() and (m <= select_experts(r, tau)).all()
        assert torch.equal(m, (r >= tau * r.sum(-1, keepdim=True)) | (r >= r.amax(-1, keepdim=True)))
    with pytest.raises(ValueError, match="'mean'"):
        select_experts(r, 0.1, reference="mean")


def test_custom_op_selects_against_the_sum():
    """The op's CPU body takes the reference; the schema's default is the paper's max."""
    import d2dmoe_kernels.op  # noqa: F401  (registers torch.ops.d2dmoe)

    E, e, d = 8, 16, 32
    w = make_layer(E, e, d, True, seed=5)
    g = torch.Generator().manual_seed(6)
    x, r_in, r_out = torch.randn(40, d, generator=g), torch.randn(24, d, generator=g), torch.randn(E, 24, generator=g)
    args = (x, r_in, r_out, 0.1, 0, 0, w["w_in"], w["w_up"], w["w_out"], w["b_in"], w["b_out"], "relu")
    scores = router_scores(x, r_in, r_out)
    for reference in ("max", "sum"):
        counters = torch.zeros(3, dtype=torch.int64)
        out = torch.ops.d2dmoe.dynamic_k_experts(*args, counters, reference)
        mask = select_experts(scores, 0.1, reference=reference)
        assert rel_err(out, dynamic_k_experts_reference(x, mask, **w, activation="relu")) < 1e-5
        assert counters.tolist() == [40, int(mask.sum()), 0]
    assert 0 < int(select_experts(scores, 0.1, reference="sum").sum()) < int(select_experts(scores, 0.1).sum())
    counters = torch.zeros(3, dtype=torch.int64)
    default = torch.ops.d2dmoe.dynamic_k_experts(*args, counters)
    assert counters[1] == int(select_experts(scores, 0.1).sum())
    assert rel_err(default, dynamic_k_experts_reference(x, select_experts(scores, 0.1), **w, activation="relu")) < 1e-5


@pytest.mark.parametrize("gated,activation", [(False, "gelu_tanh"), (False, "relu"), (True, "relu"), (True, "gelu_tanh"), (False, "gelu")])
@pytest.mark.parametrize("tokens", [1, 7, 64])
@pytest.mark.parametrize("tau", TAUS)
def test_cpu_op_matches_reference(gated, activation, tokens, tau):
    E, e, d = 12, 16, 48
    w = make_layer(E, e, d, gated, seed=tokens)
    g = torch.Generator().manual_seed(100 + tokens)
    x = torch.randn(tokens, d, generator=g)
    scores = torch.rand(tokens, E, generator=g) ** 3   # skewed: high tau leaves one expert for most tokens
    mask = select_experts(scores, tau)
    if tau == 1.0:
        assert (mask.sum(-1) == 1).all()
    ref = dynamic_k_experts_reference(x.double(), mask, **{k: None if v is None else v.double() for k, v in w.items()},
                                      activation=activation)
    out = dynamic_k_experts_cpu(x, mask, **w, activation=activation)
    assert rel_err(out, ref) < 1e-5


def test_experts_without_tokens_and_single_expert_tokens():
    E, e, d = 8, 16, 32
    w = make_layer(E, e, d, gated=True)
    x = torch.randn(5, d)
    mask = torch.zeros(5, E, dtype=torch.bool)
    mask[:, 2] = True           # every token picks only expert 2: experts 0,1,3.. get no token
    mask[4, 7] = True
    ref = dynamic_k_experts_reference(x.double(), mask, **{k: None if v is None else v.double() for k, v in w.items()},
                                      activation="relu")
    out = dynamic_k_experts_cpu(x, mask, **w, activation="relu")
    assert rel_err(out, ref) < 1e-5
    only2 = x.double() @ w["w_in"][2].double().t()
    manual = (torch.relu(only2) * (x.double() @ w["w_up"][2].double().t())) @ w["w_out"][2].double()
    assert torch.allclose(out[:4].double(), manual[:4], atol=1e-5)


@pytest.mark.parametrize("chosen", [[0], [11], [0, 1, 2], [3, 4, 9, 10, 11], [0, 2, 4, 6, 8, 10], list(range(12))])
def test_one_token_runs_of_consecutive_experts(chosen):
    """One token: a product per run of consecutive selected experts (on weight views); runs at the
    ends, single experts, every other expert, all of them."""
    from d2dmoe_kernels.cpu import _runs

    E, e, d = 12, 16, 48
    for gated in (False, True):
        w = make_layer(E, e, d, gated, seed=len(chosen))
        x = torch.randn(1, d)
        mask = torch.zeros(1, E, dtype=torch.bool)
        mask[0, chosen] = True
        assert sum(b - a for a, b in _runs(chosen)) == len(chosen)
        assert all(b < c for (_, b), (c, _) in zip(_runs(chosen), _runs(chosen)[1:]))  # maximal runs
        got = dynamic_k_experts_cpu(x, mask, **w, activation="gelu_tanh")
        assert rel_err(got, dynamic_k_experts_reference(x, mask, **w, activation="gelu_tanh")) < 1e-5


@pytest.mark.parametrize("per_token", [1, 6])
def test_both_cpu_strategies(per_token):
    """64 tokens, each selecting `per_token` of 12 experts: 1 -> the expert loop (every expert in play,
    each used by ~1/12 of the tokens), 6 -> products over runs of the experts in play; both equal the
    reference, idle experts included."""
    from d2dmoe_kernels.cpu import by_runs

    E, e, d, T = 12, 16, 48, 64
    w = make_layer(E, e, d, False, seed=per_token)
    x = torch.randn(T, d)
    mask = torch.zeros(T, E, dtype=torch.bool)
    mask.scatter_(1, torch.rand(T, E - 2).argsort(dim=1)[:, :per_token], True)  # experts 10, 11 idle
    assert by_runs(mask, mask.any(dim=0)) == (per_token == 6)
    got = dynamic_k_experts_cpu(x, mask, **w, activation="relu")
    assert rel_err(got, dynamic_k_experts_reference(x, mask, **w, activation="relu")) < 1e-5


def test_cpu_op_bf16_upcasts():
    E, e, d = 8, 32, 64
    w = make_layer(E, e, d, gated=True, dtype=torch.bfloat16)
    x = torch.randn(9, d).to(torch.bfloat16)
    mask = select_experts(torch.rand(9, E), 0.5)
    ref = dynamic_k_experts_reference(x.double(), mask, **{k: None if v is None else v.double() for k, v in w.items()},
                                      activation="gelu_tanh")
    out = dynamic_k_experts_cpu(x, mask, **w, activation="gelu_tanh")
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 2e-2


def test_custom_op_counts_and_compiles():
    E, e, d, T, width = 10, 8, 32, 6, 16
    w = make_layer(E, e, d, gated=False)
    r_in, r_out = torch.randn(width, d) / d**0.5, torch.randn(E, width) / width**0.5
    x = torch.randn(T, d)
    counters = torch.zeros(3, dtype=torch.int64)

    def layer(x, counters):
        return torch.ops.d2dmoe.dynamic_k_experts(x, r_in, r_out, 0.5, 0, 0, w["w_in"], w["w_up"], w["w_out"],
                                                  w["b_in"], w["b_out"], "gelu_tanh", counters)

    eager = layer(x, counters)
    mask = select_experts(router_scores(x, r_in, r_out), 0.5)
    assert 0 < int(mask.sum()) < T * E
    assert counters.tolist() == [T, int(mask.sum()), 0]
    compiled = torch.compile(layer, fullgraph=True)(x, counters)
    assert counters.tolist() == [2 * T, 2 * int(mask.sum()), 0]   # the mutation survives compilation
    assert torch.allclose(eager, compiled)
    ref = dynamic_k_experts_reference(x, mask, **w, activation="gelu_tanh")
    assert rel_err(eager, ref) < 1e-5


def test_unknown_activation_is_named():
    with pytest.raises(ValueError, match="unknown expert activation 'swish'"):
        dynamic_k_experts_reference(torch.randn(2, 4), torch.ones(2, 1, dtype=torch.bool), torch.randn(1, 2, 4), None,
                                    torch.randn(1, 2, 4), None, None, "swish")


def test_kernel_config_falls_back_to_the_device_family():
    """A device with a file of its own (H100 SXM, H200) gets it; one without borrows its family's
    (H100 PCIe -> H100 SXM, H200 NVL -> H200), not the untuned defaults; an unknown device gets the
    defaults."""
    import json

    from d2dmoe_kernels.configs import CONFIG_DIR, config_file, kernel_config

    h100, h200 = kernel_config("NVIDIA H100 80GB HBM3"), kernel_config("NVIDIA H200")
    defaults = kernel_config(None)
    assert h100 != defaults and h200 != defaults  # the files override something
    assert config_file("NVIDIA H200").name == "NVIDIA_H200.json"
    assert kernel_config("NVIDIA H200 NVL") == h200
    assert kernel_config("NVIDIA H100 PCIe") == h100
    assert kernel_config("Some Future GPU") == defaults
    tuned = json.loads((CONFIG_DIR / "NVIDIA_H100_80GB_HBM3.json").read_text())
    key = next(k for k in tuned if not k.startswith("_"))
    assert all(h100[key][k] == v for k, v in tuned[key].items())


def test_fp32_tiles_hold_the_bytes_of_the_tuned_ones():
    """Device files are tuned on 2-byte weights; for fp32 the fused kernel's K / N tile widths halve
    (each tile the bytes it was tuned to hold: the H200's d2048 T=2-3 tier asked 344 KB of shared
    memory otherwise), never below the 16 a tensor-core dot needs; 2-byte weights keep the config."""
    from d2dmoe_kernels.configs import for_element_size, kernel_config, path_config, token_tier

    tier = token_tier(path_config(kernel_config("NVIDIA H200"), "fused", 2048, 256), 3)
    assert for_element_size(tier, 2) is tier
    fp32 = for_element_size(tier, 4)
    assert (fp32["BLOCK_K"], fp32["BLOCK_N"]) == (tier["BLOCK_K"] // 2, tier["BLOCK_N"] // 2) == (64, 128)
    assert {k: v for k, v in fp32.items() if k not in ("BLOCK_K", "BLOCK_N")} == \
        {k: v for k, v in tier.items() if k not in ("BLOCK_K", "BLOCK_N")}
    assert for_element_size({"BLOCK_K": 16, "BLOCK_N": 32, "BLOCK_J": 64}, 4) == {"BLOCK_K": 16, "BLOCK_N": 16, "BLOCK_J": 64}


def test_masked_tiles_fit_shared_memory_in_fp32():
    """Every masked-path tile of every device file, compiled offline for sm_90 (no GPU), fits the 227 KB of
    shared memory a block may have, for bf16 and, with the launcher's rule, fp32 weights. Without the rule the
    H100 file's 64 x 32 x 256 tile (its d2048 tier for 17-64 tokens until session 49, still in its d640 / d768
    tiers) asks 256 KB in fp32, where the fp32 GPU test failed on an H100 (OutOfResources, attempt 40), so the
    check must see it."""
    import subprocess
    import sys

    from conftest import subprocess_env

    script = [sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / "check_shared_memory.py")]
    fixed = subprocess.run(script, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert "0 over the 232448 B limit" in fixed.stdout and "OVER" not in fixed.stdout
    assert any(line.startswith("64 x 32 x 256, 4, 3") for line in fixed.stdout.splitlines()), fixed.stdout
    before = subprocess.run(script + ["--no-rule", "--files", "NVIDIA_H100_80GB_HBM3"], capture_output=True, text=True,
                            env=subprocess_env(), timeout=600)
    assert before.returncode == 1, before.stdout + before.stderr
    over = [line for line in before.stdout.splitlines() if line.endswith("OVER")]
    assert len(over) == 1 and over[0].startswith("64 x 32 x 256, 4, 3") and " 262144 " in over[0], before.stdout
