"""Every validator error fires on the malformed input it is for, with a message naming field and fix."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2dmoe_vllm.checkpoint import expert_tensor_shapes, validate_checkpoint
from d2dmoe_vllm.cli import validate_main
from d2dmoe_vllm.config import CheckpointError, D2DMoEConfig


@pytest.fixture
def ckpt(tmp_path, converted_dir):
    """A fresh writable copy of a valid tiny GPT-2 D2DMoE checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(converted_dir("gpt2"), dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("d2dmoe_"):
            cfg["d2dmoe"][key[len("d2dmoe_"):]] = value
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def test_valid_checkpoint_passes(ckpt, capsys):
    cfg = validate_checkpoint(ckpt)
    assert cfg.num_experts == (16, 16) and cfg.expert_size == (32, 32) and not cfg.gated
    assert validate_main([str(ckpt)]) == 0
    assert "valid D2DMoE checkpoint" in capsys.readouterr().out


@pytest.mark.parametrize("changes,field,fix", [
    (dict(d2dmoe_tau=1.5), "d2dmoe.tau", "0 to run every expert"),
    (dict(d2dmoe_tau=-0.1), "d2dmoe.tau", "0 to run every expert"),
    (dict(d2dmoe_tau="high"), "d2dmoe.tau", "0 to run every expert"),
    (dict(d2dmoe_layer_tau=[0.1]), "d2dmoe.layer_tau", "one tau per transformer layer"),
    (dict(d2dmoe_layer_tau=[0.1, 1.5]), "d2dmoe.layer_tau", "one tau per transformer layer"),
    (dict(d2dmoe_layer_tau=0.1), "d2dmoe.layer_tau", "one tau per transformer layer"),
    (dict(d2dmoe_expert_size=[48, 48], d2dmoe_num_experts=[10, 10]), r"d2dmoe.expert_size\[0\]", "divides d_ff"),
    (dict(d2dmoe_num_experts=[16]), "d2dmoe.num_experts", "one value per transformer layer"),
    (dict(architectures=["LlamaForCausalLM"]), "architectures", "D2DMoEGPT2LMHeadModel"),
    (dict(architectures=["D2DMoEGemmaForCausalLM"]), "model_type", "keep the base model_type 'gemma'"),
    (dict(d2dmoe_format_version=7), "d2dmoe.format_version", "upgrade d2dmoe-vllm"),
    (dict(d2dmoe_activation="swish"), "d2dmoe.activation", "relu"),
    (dict(d2dmoe_gated=True), "d2dmoe.gated", "set it to False"),
    (dict(d2dmoe_d_ff=1024), "d2dmoe.d_ff", "intermediate size"),
    (dict(d2dmoe_router_width=0), "d2dmoe.router_width", "hidden width"),
    (dict(d2dmoe_expert_modules=["attn"]), "d2dmoe.expert_modules", "subset"),
    (dict(d2dmoe_top_k=-1), "d2dmoe.top_k", "top-k"),
    (dict(d2dmoe_reference="mean"), "d2dmoe.reference", "'max', 'sum'"),
    (dict(auto_map={"AutoModel": "evil.Model"}), "auto_map", "never run checkpoint code"),
    (dict(d2dmoe=None), "d2dmoe", "d2dmoe-convert"),
])
def test_config_errors(ckpt, changes, field, fix):
    edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError, match=rf"{field}:.*Fix:.*{fix}"):
        validate_checkpoint(ckpt)


def test_missing_field(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["d2dmoe"]["router_width"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"d2dmoe.router_width: missing"):
        validate_checkpoint(ckpt)


def test_malformed_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "gpt2",')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        validate_checkpoint(ckpt)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: not found"):
        validate_checkpoint(tmp_path)


def test_wrong_shape(ckpt):
    def shrink(state):
        state["transformer.h.1.mlp.experts.w_out"] = state["transformer.h.1.mlp.experts.w_out"][:, :16].contiguous()
    edit_weights(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"transformer.h.1.mlp.experts.w_out: has shape \[16, 16, 128\], "
                                              r"config.json implies \[16, 32, 128\]"):
        validate_checkpoint(ckpt)


def test_missing_tensor(ckpt):
    edit_weights(ckpt, lambda s: s.pop("transformer.h.0.mlp.router.out_proj.weight"))
    with pytest.raises(CheckpointError, match=r"transformer.h.0.mlp.router.out_proj.weight: missing"):
        validate_checkpoint(ckpt)


def test_pickle_only_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weights \(found \['pytorch_model.bin'\]: pickle files are never loaded\)"):
        validate_checkpoint(ckpt)


def test_corrupt_safetensors(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"unreadable safetensors file"):
        validate_checkpoint(ckpt)


def test_cli_reports_errors(ckpt, capsys):
    edit_config(ckpt, d2dmoe_tau=2.0)
    assert validate_main([str(ckpt)]) == 2
    assert "d2dmoe.tau" in capsys.readouterr().err


def test_deploy_time_tau_override_is_validated(ckpt):
    hf = json.loads((ckpt / "config.json").read_text())
    assert D2DMoEConfig.from_hf({**hf, "d2dmoe_tau": 0.4}).tau == 0.4
    assert D2DMoEConfig.from_hf({**hf, "d2dmoe_top_k": 3}).top_k == 3
    with pytest.raises(CheckpointError, match=r"d2dmoe_tau: 1.2 is not a number in \[0, 1\]"):
        D2DMoEConfig.from_hf({**hf, "d2dmoe_tau": 1.2})


def test_reference_reads_back(ckpt):
    """d2dmoe.reference: absent means the paper's max (older checkpoints); "sum" reads back and is written back."""
    hf = json.loads((ckpt / "config.json").read_text())
    assert "reference" not in hf["d2dmoe"] and D2DMoEConfig.from_hf(hf).reference == "max"
    assert "reference" not in D2DMoEConfig.from_hf(hf).to_dict()
    edit_config(ckpt, d2dmoe_reference="sum")
    cfg = validate_checkpoint(ckpt)
    assert cfg.reference == "sum" and cfg.to_dict()["reference"] == "sum"


def test_per_layer_tau_reads_back_and_overrides(ckpt, capsys):
    edit_config(ckpt, d2dmoe_layer_tau=[0.2, 0.05])
    cfg = validate_checkpoint(ckpt)
    assert cfg.layer_tau == (0.2, 0.05) and [cfg.mlp_tau(i) for i in (0, 1)] == [0.2, 0.05]
    assert D2DMoEConfig.from_hf(cfg_hf := json.loads((ckpt / "config.json").read_text())).to_dict()["layer_tau"] == [0.2, 0.05]
    assert validate_main([str(ckpt)]) == 0 and "tau per layer 0.05..0.2" in capsys.readouterr().out
    # A deployment tau is one tau everywhere; a deployment layer_tau replaces the checkpoint's.
    one = D2DMoEConfig.from_hf({**cfg_hf, "d2dmoe_tau": 0.4})
    assert one.layer_tau == () and [one.mlp_tau(i) for i in (0, 1)] == [0.4, 0.4]
    assert D2DMoEConfig.from_hf({**cfg_hf, "d2dmoe_layer_tau": [0.0, 1.0]}).layer_tau == (0.0, 1.0)
    with pytest.raises(CheckpointError, match=r"d2dmoe_layer_tau: needs 2 numbers in \[0, 1\]"):
        D2DMoEConfig.from_hf({**cfg_hf, "d2dmoe_layer_tau": [0.1, 0.2, 0.3]})


def test_expert_tensor_names_are_the_documented_ones(ckpt):
    hf = json.loads((ckpt / "config.json").read_text())
    names = set(expert_tensor_shapes("gpt2", 128, D2DMoEConfig.from_hf(hf)))
    assert "transformer.h.0.mlp.experts.w_in" in names and "transformer.h.0.mlp.b_out" in names
    readme = (__import__("pathlib").Path(__file__).parents[1] / "docs" / "checkpoint-format.md").read_text()
    for name in ("router.in_proj.weight", "router.out_proj.weight", "experts.w_in", "experts.w_up",
                 "experts.w_out", "experts.b_in", "mlp.b_out"):
        assert name in readme
