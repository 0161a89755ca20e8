"""benchmarks/dropped_bias_study.py: the means it fits are the dropped experts' outputs, and the hooks add
exactly the correction (checked against the reference layer with other masks, on a tiny converted Gemma 3)."""

from __future__ import annotations

import pytest
import torch

from d2dmoe_converter.dense import load_dense
from d2dmoe_converter.evaluate import build_moe, load_checkpoint
from d2dmoe_converter.moe_model import ffn_layers, set_selection
from d2dmoe_kernels.reference import dynamic_k_experts_reference


@pytest.fixture(scope="module")
def tiny(dense_dir, converted_dir):
    dense = load_dense(dense_dir("gemma3_text"))
    model = build_moe(load_checkpoint(converted_dir("gemma3_text", expert_size=16), dense), dense,
                      torch.device("cpu")).eval()
    set_selection(model, 0.6)
    torch.manual_seed(0)
    seqs = torch.randint(0, dense.config["vocab_size"], (3, 20))
    return model, ffn_layers(model), seqs


def layer_inputs(model, layers, seqs) -> list[torch.Tensor]:
    """Each FFN's input [batch, seq, d] under the model's selection."""
    from d2dmoe_converter.moe_model import run_base

    seen = [None] * len(layers)
    hs = [m.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, a[0].detach())) for i, m in enumerate(layers)]
    with torch.no_grad():
        run_base(model, seqs, len(seqs))
    for h in hs:
        h.remove()
    return seen


def test_fitted_means_are_the_dropped_experts_outputs(tiny):
    from dropped_bias_study import fit_means

    model, layers, seqs = tiny
    fit = fit_means(model, layers, seqs, [None] * len(layers))
    dropped_any = False
    for i, x in enumerate(layer_inputs(model, layers, seqs)):
        m, t = layers[i], layers[i].t
        flat = x[:, 1:].reshape(-1, x.shape[-1])                   # first positions are left out of the fit
        mask = m.select(flat)
        dropped_any |= bool((~mask).any())
        args = (t["experts.w_in"], t["experts.w_up"], t["experts.w_out"], t["experts.b_in"], None, m.activation)
        lost = dynamic_k_experts_reference(flat, torch.ones_like(mask), *args) - dynamic_k_experts_reference(flat, mask, *args)
        torch.testing.assert_close(fit.correction("layer")[i], lost.mean(0), rtol=1e-4, atol=1e-5)
        w = 1 / dynamic_k_experts_reference(flat, torch.ones_like(mask), *args).pow(2).sum(-1)
        torch.testing.assert_close(fit.correction("layer-weighted")[i], (w[:, None] * lost).sum(0) / w.sum(),
                                   rtol=1e-4, atol=1e-5)
        for e in range(m.num_experts):                              # per expert: its output where it was dropped
            rows = ~mask[:, e]
            one = torch.zeros_like(mask)
            one[:, e] = True
            want = dynamic_k_experts_reference(flat[rows], one[rows], *args).mean(0) if rows.any() else 0 * lost[0]
            torch.testing.assert_close(fit.correction("expert")[i][e], want, rtol=1e-4, atol=1e-5)
    assert dropped_any and fit.tokens == seqs.shape[0] * (seqs.shape[1] - 1)


@pytest.mark.parametrize("variant", ["layer", "expert"])
def test_hooks_add_exactly_the_correction(tiny, variant):
    from dropped_bias_study import fit_means, install

    model, layers, seqs = tiny
    correction = fit_means(model, layers, seqs, [None] * len(layers)).correction(variant)
    x = layer_inputs(model, layers, seqs)[1]
    m = layers[1]
    plain = m(x)
    handles = install(layers, correction)
    try:
        corrected = m(x)
    finally:
        for h in handles:
            h.remove()
    c = correction[1]
    want = c if c.dim() == 1 else (~m.select(x.reshape(-1, x.shape[-1]))).float() @ c
    torch.testing.assert_close(corrected - plain, want.expand_as(plain.reshape(-1, plain.shape[-1])).reshape(plain.shape),
                               rtol=1e-4, atol=1e-5)
    assert float(c.abs().max()) > 0
