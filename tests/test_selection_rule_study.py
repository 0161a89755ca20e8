"""benchmarks/selection_rule_study.py: its rules select what they say, ``max`` is the converter's own rule, and
the reference model selects by the study's rule only inside ``rule_in``."""

from __future__ import annotations

import pytest
import torch

from d2dmoe_kernels.reference import select_experts


@pytest.mark.parametrize("seed", range(3))
def test_rules_on_random_scores(seed):
    from selection_rule_study import RULES, select_by

    g = torch.Generator().manual_seed(seed)
    s = torch.rand(64, 32, generator=g) ** 3                          # skewed, like predicted norms
    s[0] = 1.0                                                         # a token whose experts all tie
    s[1, 5:] = 0.0                                                     # a token with few non-zero experts
    for tau in (0.0, 0.05, 0.2, 0.5, 1.0):
        assert torch.equal(select_by("max", s, tau), select_experts(s, tau))
        for rule in RULES:
            m = select_by(rule, s, tau)
            assert m[torch.arange(64), s.argmax(-1)].all()             # the arg-max always runs
            if tau == 0.0:
                assert m.all()
        ref = {"l2": s.norm(dim=-1), "sum": s.sum(-1)}
        for rule, r in ref.items():                                    # a threshold on the row's reference
            assert torch.equal(select_by(rule, s, tau), (s >= tau * r[:, None]) | (s >= s.amax(-1, keepdim=True)))
        m = select_by("cum", s, tau)                                   # the kept experts are the largest ones,
        for t in range(64):                                           # and what is dropped is within tau^2
            kept, dropped = s[t][m[t]], s[t][~m[t]]
            if len(dropped):
                assert dropped.max() <= kept.min()
                assert dropped.pow(2).sum() < tau**2 * s[t].pow(2).sum() + 1e-6
    # looser references keep fewer experts at the same tau (sum >= l2 >= max)
    for tau in (0.05, 0.1):
        n = {r: int(select_by(r, s, tau).sum()) for r in ("max", "l2", "sum")}
        assert n["max"] >= n["l2"] >= n["sum"]


def test_rule_in_switches_the_reference_model_and_restores_it(dense_dir, converted_dir):
    from selection_rule_study import rule_in, select_by

    from d2dmoe_converter.dense import load_dense
    from d2dmoe_converter.evaluate import build_moe, load_checkpoint
    from d2dmoe_converter.moe_model import ffn_layers, set_selection

    dense = load_dense(dense_dir("gemma3_text"))
    model = build_moe(load_checkpoint(converted_dir("gemma3_text", expert_size=16), dense), dense, torch.device("cpu"))
    set_selection(model, 0.3)
    layer = ffn_layers(model)[0]
    x = torch.randn(40, layer.t["experts.w_in"].shape[2], generator=torch.Generator().manual_seed(0))
    from d2dmoe_kernels.reference import router_scores

    scores = router_scores(x, layer.t["router.in_proj.weight"], layer.t["router.out_proj.weight"])
    plain = layer.select(x)
    with rule_in("sum"):
        assert torch.equal(layer.select(x), select_by("sum", scores, 0.3))
    assert torch.equal(layer.select(x), plain) and torch.equal(plain, select_experts(scores, 0.3))
    assert not torch.equal(select_by("sum", scores, 0.3), plain)       # the rules differ on this layer
