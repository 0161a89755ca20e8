"""Split by co-activation: neurons that fire together share an expert; the converter's option keeps the
FFN exact at tau = 0, resumes, and leaves the weights' k-means stage as it was."""

import json

import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from d2dmoe_converter.cli import main as convert_cli
from d2dmoe_converter.convert import ConvertOptions, prepare_text, source_id
from d2dmoe_converter.dense import DenseModel, load_dense
from d2dmoe_converter.hf_model import build_model, relu_config
from d2dmoe_converter.kmeans import balanced_kmeans_order
from d2dmoe_converter.routers import RouterOptions, capture_ffn_inputs
from d2dmoe_converter.split import coactivation_order, dense_ffn, dense_hidden
from d2dmoe_converter.workdir import fingerprint
from d2dmoe_kernels import dynamic_k_experts_reference
from test_convert import expert_tensors
from test_pipeline import FAST


def test_coactivation_order_groups_neurons_that_fire_together():
    """Planted: 4 groups of 16 neurons, each large (either sign) only on its own tokens, small noise
    elsewhere; the neurons shuffled. Each expert must be one group."""
    g = torch.Generator().manual_seed(0)
    E, size, T = 4, 16, 400
    group = torch.arange(E).repeat_interleave(size)
    token_group = torch.randint(0, E, (T,), generator=g)
    h = 0.05 * torch.randn(T, E * size, generator=g)
    own = token_group[:, None] == group[None, :]
    h = torch.where(own, h.sign() * (1 + torch.rand(T, E * size, generator=g)), h)   # signs mixed: |h| groups
    perm = torch.randperm(E * size, generator=g)
    order = coactivation_order(h[:, perm], E, seed=1)
    assert sorted(order.tolist()) == list(range(E * size))
    assert all(len(set(gr.tolist())) == 1 for gr in group[perm][order].reshape(E, size))
    # the data is not trivially grouped: signed profiles (no |.|) miss the groups
    signed = group[perm][balanced_kmeans_order(h[:, perm].t(), E, seed=1)].reshape(E, size)
    assert not all(len(set(gr.tolist())) == 1 for gr in signed)


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_convert_with_coactivation_split(family, dense_dir, tmp_path, capsys):
    src = dense_dir(family)
    args = [str(src), str(tmp_path / "co"), "--split", "coactivation", "--split-tokens", "1000", "--budget", "0.5",
            "--work-dir", str(tmp_path / "work"), *FAST]
    assert convert_cli(args) == 0
    info = json.loads((tmp_path / "work" / "split" / "stage.json").read_text())
    assert info["split"] == "coactivation" and info["tokens"] == 1024          # 4 sequences of 256
    assert not (tmp_path / "work" / "split" / "acts").exists()                 # captured inputs cleaned up
    report = json.loads((tmp_path / "co" / "d2dmoe_report.json").read_text())
    assert report["split"] == "coactivation" and 0 < report["tau"] < 1
    # every neuron in one expert, and all experts together are the dense FFN
    dense = tf.AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    layers = dense.transformer.h if family == "gpt2" else dense.model.layers
    cfg = json.loads((tmp_path / "co" / "config.json").read_text())["d2dmoe"]
    x = torch.randn(9, dense.config.hidden_size)
    orders = load_file(str(tmp_path / "work" / "split" / "orders.safetensors"))
    for i, layer in enumerate(layers):
        w = expert_tensors(tmp_path / "co", family, i)
        E = w["w_in"].shape[0]
        with torch.no_grad():
            want = layer.mlp(x)
        got = dynamic_k_experts_reference(x, torch.ones(9, E, dtype=torch.bool), **w, activation=cfg["activation"])
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
        assert sorted(orders[f"layer_{i}"].tolist()) == list(range(E * w["w_in"].shape[1]))
    # a rerun skips the stage; the weights' k-means is another stage (its fingerprint holds no split tokens)
    capsys.readouterr()
    assert convert_cli(args + ["--overwrite"]) == 0
    assert "[split] done earlier" in capsys.readouterr().out
    i = args.index("--split-tokens")   # refused with the weights' split, which reads no text
    kmeans = [a if a != "coactivation" else "kmeans" for a in args[:i] + args[i + 2:]]
    kmeans[1] = str(tmp_path / "km")
    assert convert_cli(kmeans) == 0
    assert "[split] done earlier" not in capsys.readouterr().out
    km = load_file(str(tmp_path / "work" / "split" / "orders.safetensors"))
    assert any(not torch.equal(km[k], orders[k]) for k in km)
    E = cfg["num_experts"][0]
    before = fingerprint(fingerprint(fingerprint(source_id(src)), False), "kmeans", E, 0)   # the key it always had
    assert json.loads((tmp_path / "work" / "split" / "stage.json").read_text())["fingerprint"] == before


def test_coactivation_reads_the_relufied_model(dense_dir, tmp_path):
    """The profiles come from the model the experts are cut from (here ReLU-fied): the orders equal those
    computed from that model's own activations on the split's tokens, and differ from the original's."""
    src = dense_dir("gpt2")
    out = tmp_path / "co"
    assert convert_cli([str(src), str(out), "--relu", "--split", "coactivation", "--split-tokens", "512",
                        "--router-steps", "0", "--tau", "0", "--expert-size", "32", "--work-dir", str(tmp_path / "w")]) == 0
    got = load_file(str(tmp_path / "w" / "split" / "orders.safetensors"))
    dense = load_dense(src)
    relu = DenseModel(relu_config(dense.config), dense.state, dense.source, dense.tokenizer)
    seqs = prepare_text(relu, ConvertOptions(split="coactivation", split_tokens=512,
                                             routers=RouterOptions(steps=0)), measure=False).split

    def orders(model_of: DenseModel, activation: str) -> dict:
        paths = capture_ffn_inputs(build_model(model_of), seqs, tmp_path)
        E = relu.d_ff // 32
        return {f"layer_{i}": coactivation_order(dense_hidden(torch.from_numpy(np.load(p)), dense_ffn(relu, i), activation), E, seed=i)
                for i, p in enumerate(paths)}

    assert all(torch.equal(got[k], v) for k, v in orders(relu, "relu").items())
    assert not all(torch.equal(got[k], v) for k, v in orders(dense, "relu").items())   # the test can tell them apart


def test_bad_split_tokens_write_nothing(dense_dir, tmp_path, capsys):
    assert convert_cli([str(dense_dir("gpt2")), str(tmp_path / "out"), "--split", "coactivation",
                        "--split-tokens", "0"]) == 2
    assert "--split-tokens must be positive" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    small = tmp_path / "small.txt"
    small.write_text("A few words of training text, repeated. " * 4000)
    assert convert_cli([str(dense_dir("gpt2")), str(tmp_path / "out"), "--corpus", str(small), "--router-steps", "0",
                        "--split-tokens", "10000000"]) == 2
    err = capsys.readouterr().err
    assert "split by co-activation (10000000 tokens)" in err and "--split kmeans" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]
    # --split-tokens where the split reads no text: refused, not silently ignored
    for split in ("kmeans", "contiguous"):
        assert convert_cli([str(dense_dir("gpt2")), str(tmp_path / "out"), "--split", split,
                            "--split-tokens", "4096"]) == 2
        err = capsys.readouterr().err
        assert f"no effect with --split {split}. Fix: drop --split-tokens" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.txt"]
