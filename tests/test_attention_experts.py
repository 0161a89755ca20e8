"""Attention-projection experts (METHOD step 5): distillation, conversion, format checks, and vLLM
serving (CPU backend) against the torch reference, at tau = 0 (the distilled dense-MLP model) and
tau > 0."""

import json
from dataclasses import replace

import pytest
import torch

from d2dmoe_converter.attention import AttentionOptions, distill, mlp_forward, mlp_hidden, resolve_projections, svd_init
from d2dmoe_converter.cli import main as convert_cli
from d2dmoe_vllm.checkpoint import validate_checkpoint
from d2dmoe_vllm.config import CheckpointError, D2DMoEConfig
from reference_model import greedy, reference_model
from test_vllm_serving import run_vllm

ATTN_ARGS = ["--attention-experts", "all", "--attn-steps", "60", "--attn-tokens", "1024", "--router-steps", "60",
             "--router-tokens", "1024", "--seq-len", "128"]


@pytest.fixture(scope="module")
def attn_ckpt(tmp_path_factory, dense_dir):
    """Factory: tiny checkpoint with FFN and every attention projection as experts (cached)."""
    root = tmp_path_factory.mktemp("attn")
    cache = {}

    def get(family: str):
        if family not in cache:
            out = root / family
            assert convert_cli([str(dense_dir(family)), str(out), "--expert-size", "32", *ATTN_ARGS]) == 0
            cache[family] = out
        return cache[family]

    return get


def test_equal_cost_hidden_width():
    # square d x d with bias: h (2d + 1) + d <= d^2 + d, rounded down to whole experts
    assert mlp_hidden(768, 768, 16) == 384 - 384 % 16
    h = mlp_hidden(640, 256, 16)
    assert h % 16 == 0 and h * (640 + 256 + 1) + 256 <= 640 * 256 + 256 < (h + 16) * (640 + 256 + 1) + 256


def test_svd_start_is_the_truncated_svd_and_distillation_lowers_mse():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 64, generator=g) / 8, torch.randn(48, generator=g)
    x = torch.randn(2000, 64, generator=g)
    m = svd_init(w, b, 40)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    rank20 = (u[:, :20] * s[:20]) @ vh[:20]
    torch.testing.assert_close(mlp_forward(x, m), x @ rank20.t() + b, rtol=1e-4, atol=1e-4)
    mlp, metrics = distill(x, w, b, 40, AttentionOptions(steps=200, batch=256, lr=3e-3), 0, torch.device("cpu"))
    assert metrics["mse_distilled"] < 0.9 * metrics["mse_svd_init"]
    y_val = x[-200:] @ w.t() + b
    assert float((mlp_forward(x[-200:], mlp) - y_val).pow(2).mean()) == pytest.approx(metrics["mse_distilled"], rel=1e-4)


def test_projection_names_are_checked():
    assert resolve_projections("gemma3_text", ("all",)) == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert resolve_projections("gpt2", ("c_proj",)) == ("c_proj",)
    with pytest.raises(ValueError, match="go together"):
        resolve_projections("gemma", ("q_proj", "o_proj"))
    with pytest.raises(ValueError, match="not gpt2 projections.*c_attn,c_proj"):
        resolve_projections("gpt2", ("q_proj",))


def test_moefication_with_attention_experts_is_refused(tmp_path, dense_dir, capsys):
    rc = convert_cli([str(dense_dir("gpt2")), str(tmp_path / "x"), "--method", "moefication", "--budget", "0.5",
                      "--attention-experts", "all"])
    assert rc == 2 and "D2DMoE (dynamic-k) feature" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_conversion_writes_projection_experts(attn_ckpt, family):
    ckpt = attn_ckpt(family)
    cfg = validate_checkpoint(ckpt)
    names = {"gpt2": ["c_attn", "c_proj"], "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj"]}[family]
    assert list(cfg.expert_modules) == ["mlp", *names]
    assert [p.name for p in cfg.projections] == names
    report = json.loads((ckpt / "d2dmoe_report.json").read_text())["attention_experts"]
    assert report["mse_distilled"] < report["mse_svd_init"]      # distillation improved on its start
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as st:
        keys = set(st.keys())
    dense_names = {"gpt2": ["attn.c_attn.weight", "attn.c_proj.bias"], "gemma3_text": ["self_attn.q_proj.weight",
                                                                                        "self_attn.o_proj.weight"]}
    prefix = "transformer.h.0." if family == "gpt2" else "model.layers.0."
    assert not any(prefix + n in keys for n in dense_names[family])   # replaced projections are gone
    assert prefix + ("attn." if family == "gpt2" else "self_attn.") + names[0] + ".experts.w_out" in keys


def test_projection_config_errors(attn_ckpt):
    hf = json.loads((attn_ckpt("gemma3_text") / "config.json").read_text())
    D2DMoEConfig.from_hf(hf)
    bad = json.loads(json.dumps(hf))
    bad["d2dmoe"]["projection_experts"]["k_proj"]["expert_size"] = [16, 8]
    with pytest.raises(CheckpointError, match=r"projection_experts.k_proj.expert_size\[1\].*Fix"):
        D2DMoEConfig.from_hf(bad)
    bad = json.loads(json.dumps(hf))
    del bad["d2dmoe"]["projection_experts"]["o_proj"]
    with pytest.raises(CheckpointError, match="projection_experts.*one .* entry per projection"):
        D2DMoEConfig.from_hf(bad)
    bad = json.loads(json.dumps(hf))
    bad["d2dmoe"]["expert_modules"] = ["mlp", "q_proj", "o_proj"]
    with pytest.raises(CheckpointError, match="q_proj, k_proj, v_proj"):
        D2DMoEConfig.from_hf(bad)


def test_projection_experts_refuse_tensor_parallel(attn_ckpt):
    from d2dmoe_vllm.expert_layer import DynamicKMLP

    cfg = D2DMoEConfig.from_hf(json.loads((attn_ckpt("gemma3_text") / "config.json").read_text()))
    with pytest.raises(CheckpointError, match="tensor_parallel_size=1 only"):
        DynamicKMLP(cfg, 0, 0, "model.layers.0.self_attn.q_proj", tp_rank=0, tp_size=2,
                    projection=cfg.projection("q_proj"))
    assert replace(cfg, projections=()).projection("q_proj") is None


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
@pytest.mark.parametrize("tau", [0.0, 0.6])
def test_vllm_serves_attention_experts_like_the_reference(tmp_path, dense_dir, attn_ckpt, family, tau):
    """tau = 0: every expert runs, i.e. the distilled dense-MLP model; tau > 0: the masked reference.
    Also the engine's counters: projection layers are reported beside the FFN layers."""
    ckpt = attn_ckpt(family)
    out = run_vllm(tmp_path, ckpt, "moe", report=True, llm_kwargs={"hf_overrides": {"d2dmoe_tau": tau}})
    ref = reference_model(dense_dir(family), ckpt, tau)
    for o in out["batch"]:
        tokens, logprobs = greedy(ref, o["prompt_ids"], 8)
        assert o["tokens"] == tokens
        assert max(abs(p - q) for p, q in zip(o["logprobs"], logprobs)) < 1e-3
    report = out["report"]
    modules = {r["module"] for r in report["layers"]}
    assert modules == {"mlp", *(p.name for p in validate_checkpoint(ckpt).projections)}
    if tau == 0.0:
        assert report["overall_fraction"] == 1.0 and report["projection_fraction"] == 1.0
    else:
        assert 0.0 < report["projection_fraction"] < 1.0
