"""d2dmoe-convert: the split reproduces the dense FFN exactly; bad input is refused and writes nothing."""

import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from d2dmoe_converter.cli import main as convert_cli
from d2dmoe_kernels import dynamic_k_experts_reference
from d2dmoe_vllm.checkpoint import layer_prefix


def expert_tensors(ckpt, model_type, layer):
    state = load_file(str(ckpt / "model.safetensors"))
    p = layer_prefix(model_type, layer) + "mlp."
    get = lambda n: state.get(p + n)  # noqa: E731
    return dict(w_in=get("experts.w_in"), w_up=get("experts.w_up"), w_out=get("experts.w_out"),
                b_in=get("experts.b_in"), b_out=get("b_out"))


@pytest.mark.parametrize("family", ["gpt2", "gemma", "gemma2", "gemma3_text"])
def test_split_equals_dense_ffn(family, dense_dir, converted_dir):
    dense = tf.AutoModelForCausalLM.from_pretrained(str(dense_dir(family)), dtype=torch.float32)
    ckpt = converted_dir(family)
    cfg = json.loads((ckpt / "config.json").read_text())["d2dmoe"]
    layers = dense.transformer.h if family == "gpt2" else dense.model.layers
    x = torch.randn(11, 128)
    for i, layer in enumerate(layers):
        w = expert_tensors(ckpt, family, i)
        E, e, d = w["w_in"].shape
        assert (E, e) == (cfg["num_experts"][i], cfg["expert_size"][i]) and E * e == cfg["d_ff"]
        # every dense neuron lands in exactly one expert
        dense_rows = layer.mlp.c_fc.weight.t() if family == "gpt2" else layer.mlp.gate_proj.weight
        rows = w["w_in"].reshape(E * e, d)
        match = (rows[:, None, :] == dense_rows[None, :, :]).all(-1)
        assert (match.sum(0) == 1).all() and (match.sum(1) == 1).all()
        with torch.no_grad():
            want = layer.mlp(x)
        got = dynamic_k_experts_reference(x, torch.ones(11, E, dtype=torch.bool), **w, activation=cfg["activation"])
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_relufy_updates_config(converted_dir):
    gpt2 = json.loads((converted_dir("gpt2", relufy=True) / "config.json").read_text())
    assert gpt2["activation_function"] == "relu" and gpt2["d2dmoe"]["activation"] == "relu"
    gemma = json.loads((converted_dir("gemma3_text", relufy=True) / "config.json").read_text())
    assert gemma["hidden_activation"] == "relu" and gemma["d2dmoe"]["activation"] == "relu"
    assert gemma["architectures"] == ["D2DMoEGemma3ForCausalLM"] and gemma["model_type"] == "gemma3_text"
    assert "lm_head.weight" not in load_file(str(converted_dir("gemma3_text", relufy=True) / "model.safetensors"))


def test_bad_expert_size_writes_nothing(dense_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert_cli([str(dense_dir("gpt2")), str(out), "--expert-size", "48"]) == 2
    assert "expert size 48 does not divide the FFN width d_ff = 512" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


@pytest.mark.parametrize("args,message", [
    (["--tau", "1.5"], "--tau: 1.5 is not a number in [0, 1]"),
    (["--router-width", "0"], "--router-width must be positive"),
    (["--reference", "sum", "--method", "moefication", "--budget", "0.5"], "--reference sets what dynamic-k's tau"),
])
def test_bad_options(dense_dir, tmp_path, capsys, args, message):
    assert convert_cli([str(dense_dir("gpt2")), str(tmp_path / "out")] + args) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path, capsys):
    src = tmp_path / "llama"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    assert "model_type 'llama' is not supported" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [(None, "neither a directory nor a .gguf file"),
                                             ("{oops", "is not valid JSON")])
def test_unreadable_input(tmp_path, capsys, content, message):
    src = tmp_path / "model"
    if content is not None:
        src.mkdir()
        (src / "config.json").write_text(content)
    assert convert_cli([str(src), str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err


def test_existing_output_is_kept(dense_dir, converted_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert convert_cli([str(dense_dir("gpt2")), str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


def test_tokenizer_read_without_merges_is_refused(tmp_path):
    """A GGUF tokenizer read without its BPE merges (transformers 5.17 does this to Gemma 3's) splits
    words into pieces; the converter refuses it instead of training on garbage tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from d2dmoe_converter.dense import check_bpe_merges
    from d2dmoe_vllm.config import CheckpointError
    from tiny_models import gpt2_tokenizer_files

    gpt2_tokenizer_files(tmp_path)
    good = tf.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    check_bpe_merges(good, tmp_path / "model.gguf")  # real merges: accepted
    raw = Tokenizer(models.BPE(good.get_vocab(), []))  # same vocabulary, no merges
    raw.pre_tokenizer, raw.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bad = tf.PreTrainedTokenizerFast(tokenizer_object=raw)
    with pytest.raises(CheckpointError, match=r"model.gguf: transformers .* without the BPE merges.*transformers>=5.19"):
        check_bpe_merges(bad, tmp_path / "model.gguf")
