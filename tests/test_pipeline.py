"""The conversion pipeline's stages on tiny models and real text (State of the Union): sparsify,
split, routers, calibrate, export, resume, the MoEfication baseline, and bad input."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import subprocess_env
from d2dmoe_converter.calibrate import allocate
from d2dmoe_converter.cli import main as convert_cli
from d2dmoe_converter.dense import DenseModel, load_dense
from d2dmoe_converter.hf_model import build_model
from d2dmoe_converter.moe_model import attach_experts, ffn_fraction, run_base, set_selection
from d2dmoe_converter.routers import RouterOptions, train_layer_router
from d2dmoe_converter.corpus import CorpusError, token_sequences
from d2dmoe_converter.distill_kl import distill_loss
from d2dmoe_converter.sparsify import (HoyerActivation, SparsifyOptions, finetune, hoyer_activations_, relu_blend,
                                       square_hoyer)

FAST = ["--router-tokens", "4096", "--router-steps", "200", "--calib-tokens", "1024", "--eval-tokens", "1024",
        "--seq-len", "128", "--expert-size", "32"]


def test_square_hoyer_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    # token 1: (1+2)^2 / (1+4) = 1.8; token 2: 9/9 = 1; token 3: 16/4 = 4; mean 6.8/3
    assert square_hoyer(a).item() == pytest.approx(6.8 / 3, rel=1e-6)
    act = HoyerActivation().train()
    act(torch.tensor([[-1.0, 2.0, 2.0]]))
    assert act.hoyer.item() == pytest.approx(16 / 8, rel=1e-6) and act.zero_fraction.item() == pytest.approx(1 / 3)


def test_kept_activation_is_measured_not_replaced():
    """``keep`` wraps the model's own activation: the same outputs (negative GELU values stay), the square
    Hoyer of those outputs, near-zero (|a| < 0.01) counted as zero; ``relu`` replaces it."""
    gelu = torch.nn.GELU(approximate="tanh")
    act = HoyerActivation(gelu).train()
    x = torch.tensor([[-6.0, -1.0, 0.001, 2.0]])
    a = act(x)
    assert torch.equal(a, gelu(x)) and a[0, 1] < -0.1
    assert act.hoyer.item() == pytest.approx(float(a.abs().sum() ** 2 / a.pow(2).sum()), rel=1e-5)
    assert act.zero_fraction.item() == pytest.approx(2 / 4)             # -6 -> ~0 and 0.001 -> ~0.0005
    act.eval()
    act(torch.ones(1, 4))
    assert act.hoyer.item() == pytest.approx(float(a.abs().sum() ** 2 / a.pow(2).sum()), rel=1e-5)  # kept from training


def test_interrupted_anneal_resumes_where_it_stopped(dense_dir, tmp_path, monkeypatch):
    """An anneal run cut after its save at step 2 and run again from the saved state ends where an uncut run
    ends: the same weights and the same blend per step (the blend follows the step, not the process)."""
    from d2dmoe_converter import sparsify as sparsify_mod

    dense = load_dense(dense_dir("gemma3_text"))
    seqs = torch.randint(0, dense.config["vocab_size"], (12, 16), generator=torch.Generator().manual_seed(0))
    opts = SparsifyOptions(steps=6, batch=2, seq_len=16, lr=1e-3, warmup=1, alpha=0.05, save_every=2,
                           activation="anneal")

    def run(state):
        torch.manual_seed(0)
        model = build_model(dense)
        hoyer_activations_(model, "anneal")
        return model, finetune(model, seqs, opts, state)["log"]

    whole, whole_log = run(tmp_path / "whole.pt")
    real = sparsify_mod.lr_at

    def cut(step, o):
        if step == 3:
            raise KeyboardInterrupt("cut")
        return real(step, o)

    monkeypatch.setattr(sparsify_mod, "lr_at", cut)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut.pt")
    monkeypatch.setattr(sparsify_mod, "lr_at", real)
    resumed, resumed_log = run(tmp_path / "cut.pt")
    assert [r["relu_blend"] for r in resumed_log] == [r["relu_blend"] for r in whole_log]
    assert [r["step"] for r in resumed_log] == list(range(1, 7))
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_annealed_activation_goes_from_the_own_to_relu():
    """``anneal``: blend 0 is the own activation, 1 is ReLU exactly (exact zeros counted), in between the
    straight mix; the schedule reaches 1 at half the steps and stays there."""
    gelu = torch.nn.GELU(approximate="tanh")
    act = HoyerActivation(gelu, anneal=True).train()
    x = torch.tensor([[-6.0, -1.0, 0.5, 2.0]])
    assert torch.equal(act(x), gelu(x))
    act.blend = 0.25
    assert torch.allclose(act(x), 0.25 * torch.relu(x) + 0.75 * gelu(x))
    act.blend = 1.0
    assert torch.equal(act(x), torch.relu(x)) and act.zero_fraction.item() == pytest.approx(0.5)
    opts = SparsifyOptions(steps=10, activation="anneal")
    blends = [relu_blend(i, opts) for i in range(10)]
    assert blends[0] == pytest.approx(0.2) and blends[4:] == [1.0] * 6 and blends == sorted(blends)


@pytest.mark.parametrize("activation", ["relu", "keep", "anneal"])
def test_hoyer_activations_wrap_every_gemma_gate(dense_dir, activation):
    dense = load_dense(dense_dir("gemma3_text"))
    model = build_model(dense)
    x = torch.randint(0, dense.config["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=x).logits
    acts = hoyer_activations_(model, activation)
    assert len(acts) == dense.num_layers
    with torch.no_grad():
        after = model(input_ids=x).logits
    assert torch.equal(before, after) == (activation != "relu")        # keep / anneal start as the model was
    with pytest.raises(ValueError, match="keep"):
        hoyer_activations_(build_model(dense), "gelu")


def test_distill_loss_is_kl_of_teacher_to_student():
    """Over every position but the last (which predicts past the sequence: its logits do not count)."""
    t = torch.tensor([[[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]]])
    assert distill_loss(t, t).item() == pytest.approx(0.0, abs=1e-7)
    s = torch.tensor([[[2.0, 1.0, 0.0], [0.0, 0.0, 9.0]]])
    p, q = torch.softmax(t[0, 0], -1), torch.softmax(s[0, 0], -1)
    assert distill_loss(s, t).item() == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)


def test_chunked_distill_loss_and_gradient_match_autograd():
    """The chunked KL (gradient computed in the forward pass) against plain autograd on the positions
    but the last (whose gradient is zero), chunk sizes that do and do not divide the count, logits in
    bf16 (as under autocast) and fp32."""
    g = torch.Generator().manual_seed(0)
    s0, t = torch.randn(3, 7, 50, generator=g) * 3, torch.randn(3, 7, 50, generator=g) * 3
    ref_s = s0.clone().requires_grad_(True)
    ref = torch.nn.functional.kl_div(torch.log_softmax(ref_s[:, :-1].reshape(-1, 50), -1),
                                     torch.log_softmax(t[:, :-1].reshape(-1, 50), -1), log_target=True,
                                     reduction="batchmean")
    ref.backward()
    assert (ref_s.grad[:, -1] == 0).all()
    for chunk in (1, 4, 21, 1000):
        s = s0.clone().requires_grad_(True)
        loss = distill_loss(s, t, chunk=chunk)
        (2 * loss).backward()
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        assert torch.allclose(s.grad, 2 * ref_s.grad, rtol=1e-4, atol=1e-7)
    s = s0.to(torch.bfloat16).requires_grad_(True)
    distill_loss(s, t.to(torch.bfloat16), chunk=5).backward()
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad).all()
    assert (s.grad.float() - ref_s.grad).norm() / ref_s.grad.norm() < 0.1


def test_distillation_pulls_relufied_model_toward_original(dense_dir, tmp_path):
    """KL-only fine-tuning (distill 1, no Hoyer) lowers the ReLU-fied model's KL to the original on
    held-out sequences; without a teacher the option is refused."""
    dense = load_dense(dense_dir("gpt2"))
    no_dropout = {k: 0.0 for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")}   # dropout noise would swamp the KL
    dense = DenseModel({**dense.config, **no_dropout}, dense.state, dense.source, dense.tokenizer)
    teacher = build_model(dense).requires_grad_(False).eval()
    student = build_model(dense).eval()
    hoyer_activations_(student)
    g = torch.Generator().manual_seed(0)
    vocab = dense.config["vocab_size"]
    seqs, held = torch.randint(0, vocab, (32, 32), generator=g), torch.randint(0, vocab, (8, 32), generator=g)

    def kl():
        with torch.no_grad():
            return distill_loss(student(input_ids=held).logits, teacher(input_ids=held).logits).item()

    opts = SparsifyOptions(steps=8, batch=4, seq_len=32, lr=1e-4, warmup=1, alpha=0.0, distill=1.0, save_every=100)
    with pytest.raises(ValueError, match="teacher"):
        finetune(student, seqs, opts, tmp_path / "state.pt")
    before = kl()
    log = finetune(student, seqs, opts, tmp_path / "state.pt", teacher)["log"]
    assert before > 0 and kl() < 0.5 * before
    assert all(r["task_loss"] == r["task_loss"] for r in log)                 # no NaN
    # a mix: (1 - w) cross-entropy + w KL, both terms finite and the step taken
    mixed = build_model(dense).eval()
    hoyer_activations_(mixed)
    log = finetune(mixed, seqs, dataclasses.replace(opts, steps=2, distill=0.5), tmp_path / "mixed.pt", teacher)["log"]
    assert len(log) == 2 and all(math.isfinite(r["task_loss"]) and r["task_loss"] > 0 for r in log)


class _CharTokenizer:
    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_token_sequences_reuse_the_text_only_when_passes_allow():
    docs = ("abcd", "efgh", "ijkl")                                           # 15 tokens per pass with EOS
    with pytest.raises(CorpusError, match="in 1 pass"):
        token_sequences(_CharTokenizer(), docs, 4, 6, bos=1)
    ids = token_sequences(_CharTokenizer(), docs, 4, 6, bos=1, passes=2)
    assert ids.shape == (4, 6) and (ids[:, 0] == 1).all()
    stream = ids[:, 1:].reshape(-1).tolist()                                 # 20 tokens: 15 + 5 of pass 2
    assert sorted(stream[:15]) == sorted([0, 0, 0] + [ord(c) for c in "abcdefghijkl"])
    assert len(stream) == 20 and set(stream[15:]) <= set(stream[:15])


def test_router_training_lowers_heldout_mse():
    g = torch.Generator().manual_seed(0)
    E, e, d = 8, 16, 64
    ex = {"experts.w_in": torch.randn(E, e, d, generator=g) * d**-0.5, "experts.w_up": None,
          "experts.w_out": torch.randn(E, e, d, generator=g) * e**-0.5, "experts.b_in": torch.zeros(E, e)}
    x = torch.randn(4000, d, generator=g)
    _, m = train_layer_router(x, ex, "relu", "d2dmoe", RouterOptions(width=64, steps=400, batch=256, lr=3e-3), 0,
                              torch.device("cpu"))
    assert m["val_loss_after"] < 0.5 * m["val_loss_before"] and m["val_r2"] > 0.3
    _, m = train_layer_router(x, ex, "relu", "moefication", RouterOptions(width=64, steps=400, batch=256, lr=3e-3), 0,
                              torch.device("cpu"))
    assert m["val_loss_after"] < m["val_loss_before"]


@pytest.fixture(scope="module")
def pipeline(dense_dir, tmp_path_factory):
    """One full run on a tiny GPT-2: sparsify (a few steps) -> split -> routers -> calibrate to 50%."""
    root = tmp_path_factory.mktemp("pipeline")
    out = root / "moe"
    args = [str(dense_dir("gpt2")), str(out), "--sparsify-steps", "6", "--sparsify-batch", "4", "--warmup", "2",
            "--sparsify-lr", "1e-3", "--hoyer-alpha", "0.05", "--save-every", "3", "--budget", "0.5", *FAST]
    assert convert_cli(args) == 0
    return out, root / "moe.work"


def test_pipeline_stages_and_report(pipeline):
    out, work = pipeline
    for stage in ("sparsify", "split", "routers", "calibrate"):
        info = json.loads((work / stage / "stage.json").read_text())
        assert info["stage"] == stage and info["seconds"] >= 0
        assert not (work / f"{stage}.partial").exists()
    assert (work / "sparsify" / "sparsify.png").stat().st_size > 0
    log = json.loads((work / "sparsify" / "stage.json").read_text())["log"]
    assert len(log) == 6 and log[-1]["hoyer"] < log[0]["hoyer"]          # the Hoyer term is being minimised
    routers = json.loads((work / "routers" / "stage.json").read_text())["layers"]
    assert all(m["val_loss_after"] < m["val_loss_before"] for m in routers)
    assert not (work / "routers" / "acts").exists()                        # captured activations cleaned up
    report = json.loads((out / "d2dmoe_report.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["activation_function"] == "relu" and cfg["d2dmoe"]["activation"] == "relu"
    assert cfg["d2dmoe"]["tau"] == report["tau"] and 0 < report["tau"] < 1
    assert report["ppl_dense"] > 1 and report["ppl_converted"] > 1
    assert set(report["seconds"]) >= {"load", "sparsify", "split", "routers", "calibrate", "export", "total"}


def test_calibrate_hits_budget(pipeline):
    """Stated tolerance: on the calibration tokens the fraction is <= budget and within 0.03 of it;
    on the separate held-out tokens within 0.06."""
    _, work = pipeline
    result = json.loads((work / "calibrate" / "result.json").read_text())
    assert 0.47 <= result["calib_fraction"] <= 0.5
    assert abs(result["ffn_fraction"] - 0.5) <= 0.06
    fractions = [p["ffn_fraction"] for p in sorted(result["trace"], key=lambda p: p["tau"])]
    # fewer experts as tau rises (up to small effects of earlier layers' routing on later layers' inputs)
    assert all(b <= a + 0.01 for a, b in zip(fractions, fractions[1:])) and fractions[0] > fractions[-1]


def test_allocate_spends_the_budget_where_it_costs_least():
    """Two layers of equal compute: dropping experts costs layer 0 a lot and layer 1 little, so a
    middle price thins layer 1 only; no price thins nothing, a high one thins both."""
    taus = [0.0, 0.1, 0.2]
    curves = [[(0.0, 1.0), (0.5, 0.6), (2.0, 0.3)],     # (delta NLL, fraction) at each tau
              [(0.0, 1.0), (0.01, 0.5), (0.02, 0.2)]]
    assert allocate(curves, taus, [0.5, 0.5], 0.0) == [0.0, 0.0]
    assert allocate(curves, taus, [0.5, 0.5], 1.0) == [0.0, 0.2]
    assert allocate(curves, taus, [0.5, 0.5], 100.0) == [0.2, 0.2]
    # Compute shares weigh the saving: layer 1 holding 1% of the compute is no longer worth thinning.
    assert allocate(curves, taus, [0.99, 0.01], 1.0) == [0.0, 0.0]
    assert allocate(curves, taus, [0.99, 0.01], 4.0) == [0.1, 0.2]


def test_tau_per_layer_calibration(pipeline, dense_dir, tmp_path, capsys):
    """--tau-per-layer on the pipeline's finished stages: only calibrate runs again; the allocation keeps
    the budget on the calibration tokens and is written (config, report) only where it beat one tau."""
    out, work = pipeline
    work2, out2 = tmp_path / "work", tmp_path / "moe"
    shutil.copytree(work, work2)
    args = [str(dense_dir("gpt2")), str(out2), "--work-dir", str(work2), "--sparsify-steps", "6", "--sparsify-batch",
            "4", "--warmup", "2", "--sparsify-lr", "1e-3", "--hoyer-alpha", "0.05", "--save-every", "3",
            "--budget", "0.5", *FAST, "--tau-per-layer", "--sensitivity-tokens", "512"]
    assert convert_cli(args) == 0
    printed = capsys.readouterr().out
    assert all(f"[{s}] done earlier" in printed for s in ("sparsify", "split", "routers"))
    assert "[calibrate-per-layer] done earlier" not in printed and (work2 / "calibrate" / "result.json").is_file()
    result = json.loads((work2 / "calibrate-per-layer" / "result.json").read_text())
    per, tau = result["per_layer"], result["tau"]
    assert per["grid"] == sorted({0.0, *(min(1.0, g * tau) for g in (0.5, 1.0, 1.5, 2.0, 3.0))})
    assert len(per["sensitivity"]) == 2 and all(len(c) == len(per["grid"]) for c in per["sensitivity"])
    for curve in per["sensitivity"]:
        assert curve[0]["delta_nll"] == 0.0 and curve[0]["fraction"] == 1.0        # tau 0: the dense model
        assert curve[-1]["fraction"] < curve[0]["fraction"]
    assert all(t in per["grid"] for t in per["grid_choice"])
    assert [c["blend"] for c in per["candidates"]] == [0.25, 0.5, 0.75, 1.0]    # every blend found a scale
    assert all(c["fraction"] <= 0.5 and all(0 <= t <= 1 for t in c["layer_tau"]) for c in per["candidates"])
    assert all(c["fraction"] > 0.5 - 0.005 for c in per["candidates"]), per["candidates"]   # spent, not left over
    best = min(per["candidates"], key=lambda c: c["calib_nll"])
    kept = best["calib_nll"] < per["one_tau_calib_nll"]
    assert per["best"] == best and per["layer_tau"] == (best["layer_tau"] if kept else None)
    cfg = json.loads((out2 / "config.json").read_text())["d2dmoe"]
    report = json.loads((out2 / "d2dmoe_report.json").read_text())
    assert cfg.get("layer_tau") == per["layer_tau"] == report["layer_tau"] and cfg["tau"] == tau
    assert ("tau per layer" in printed) == kept
    assert re.search(r"per-layer taus\s+" + ("kept" if kept else "not kept") + ": calibration NLL", printed)
    assert abs(result["ffn_fraction"] - 0.5) <= 0.08
    # At a budget one tau meets by running every expert there is nothing to allocate: said, not hidden.
    args[args.index("--budget") + 1] = "1.0"
    assert convert_cli([*args, "--overwrite"]) == 0
    assert "per-layer taus         skipped: one tau = 0 already runs every expert" in capsys.readouterr().out
    assert "layer_tau" not in json.loads((out2 / "config.json").read_text())["d2dmoe"]
    # Per-layer options are not one tau's: changing them leaves its finished calibration alone.
    one_tau = [a for a in args if a != "--tau-per-layer"]
    one_tau[one_tau.index("--budget") + 1], one_tau[one_tau.index("--sensitivity-tokens") + 1] = "0.5", "256"
    assert convert_cli([*one_tau, "--overwrite"]) == 0
    assert "[calibrate] done earlier" in capsys.readouterr().out


def test_reference_sum_calibration(pipeline, dense_dir, tmp_path, capsys):
    """--reference sum on the pipeline's finished stages: only calibrate runs again, tau is bisected against
    the sum of the router's scores to the same budget, and the checkpoint says so; the paper's max keeps the
    calibration fingerprint it had before the option existed."""
    from d2dmoe_converter.calibrate import CalibrateOptions

    assert "reference" not in CalibrateOptions().stage_key()
    assert CalibrateOptions(reference="sum").stage_key()["reference"] == "sum"
    out, work = pipeline
    work2, out2 = tmp_path / "work", tmp_path / "moe"
    shutil.copytree(work, work2)
    args = [str(dense_dir("gpt2")), str(out2), "--work-dir", str(work2), "--sparsify-steps", "6", "--sparsify-batch",
            "4", "--warmup", "2", "--sparsify-lr", "1e-3", "--hoyer-alpha", "0.05", "--save-every", "3",
            "--budget", "0.5", *FAST, "--reference", "sum"]
    assert convert_cli(args) == 0
    printed = capsys.readouterr().out
    assert all(f"[{s}] done earlier" in printed for s in ("sparsify", "split", "routers"))
    assert "[calibrate] done earlier" not in printed
    summed = json.loads((work2 / "calibrate" / "result.json").read_text())
    by_max = json.loads((work / "calibrate" / "result.json").read_text())
    assert 0.47 <= summed["calib_fraction"] <= 0.5 and abs(summed["ffn_fraction"] - 0.5) <= 0.06
    assert 0 < summed["tau"] < by_max["tau"]        # a fraction of the sum, not of the top score
    cfg = json.loads((out2 / "config.json").read_text())["d2dmoe"]
    assert cfg["reference"] == "sum" and cfg["tau"] == summed["tau"]
    assert "reference" not in json.loads((out / "config.json").read_text())["d2dmoe"]


def test_split_model_at_tau0_equals_relufied_dense(pipeline):
    """The exported experts at tau = 0 reproduce the (sparsified, ReLU-fied) dense model's logits."""
    out, work = pipeline
    dense = load_dense(work / "sparsify")
    ref = build_model(dense).eval()
    moe = build_model(dense).eval()
    cfg = json.loads((out / "config.json").read_text())
    attach_experts(moe, load_file(str(out / "model.safetensors")), "gpt2", "relu", tau=0.0)
    ids = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(input_ids=ids).logits, moe(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    set_selection(moe, cfg["d2dmoe"]["tau"])
    run_base(moe, ids)
    assert 0 < ffn_fraction(moe) < 1


def test_rerun_skips_finished_stages(pipeline, dense_dir, capsys):
    out, work = pipeline
    stamps = {s: (work / s / "stage.json").stat().st_mtime_ns for s in ("sparsify", "split", "routers", "calibrate")}
    args = [str(dense_dir("gpt2")), str(out), "--sparsify-steps", "6", "--sparsify-batch", "4", "--warmup", "2",
            "--sparsify-lr", "1e-3", "--hoyer-alpha", "0.05", "--save-every", "3", "--budget", "0.5", *FAST,
            "--overwrite"]
    assert convert_cli(args) == 0
    printed = capsys.readouterr().out
    assert all(f"[{s}] done earlier" in printed for s in stamps)
    assert all((work / s / "stage.json").stat().st_mtime_ns == t for s, t in stamps.items())


def test_resume_after_killed_stage(dense_dir, tmp_path):
    """Kill the converter while it trains routers; the finished split stage is untouched, the rerun
    resumes at the next layer, and the result equals an uninterrupted run's."""
    args = [str(dense_dir("gemma3_text")), "--router-steps", "4000", "--router-tokens", "2048", "--seq-len", "128",
            "--expert-size", "32", "--tau", "0.5", "--calib-tokens", "256", "--eval-tokens", "256"]
    out, work = tmp_path / "moe", tmp_path / "moe.work"
    cmd = [sys.executable, "-m", "d2dmoe_converter.cli", args[0], str(out), *args[1:]]
    # bit-exact across processes: one thread and MKL's strict reproducibility mode (without it MKL's
    # GEMM may round differently with the buffers' alignment, which k-means and 4000 router steps carry
    # into the weights; the full suite failed this way now and then, the test alone never did)
    env = subprocess_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MKL_CBWR="AUTO,STRICT")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = work / "routers.partial" / "router_00.safetensors"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert first.exists() and not (work / "routers.partial" / "router_01.safetensors").exists()
    assert not out.exists() and not (work / "routers").exists()
    split_stamp = (work / "split" / "stage.json").stat().st_mtime_ns
    first_bytes = first.read_bytes()
    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "[split] done earlier" in rerun.stdout
    assert (work / "split" / "stage.json").stat().st_mtime_ns == split_stamp
    assert (work / "routers" / "router_00.safetensors").read_bytes() == first_bytes   # layer 0 was not redone
    clean = tmp_path / "clean"  # a subprocess too, with the same thread settings
    done = subprocess.run([*cmd[:3], args[0], str(clean), *args[1:]], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(clean / "model.safetensors"))
    assert a.keys() == b.keys()
    differ = {k: float((a[k].float() - b[k].float()).abs().max()) for k in a if not torch.equal(a[k], b[k])}
    assert not differ, differ


def test_moefication_exports_and_serves(dense_dir, tmp_path):
    from test_vllm_serving import check_against_reference, run_vllm

    out = tmp_path / "moefication"
    assert convert_cli([str(dense_dir("gpt2", "relu")), str(out), "--method", "moefication", "--budget", "0.25",
                        *FAST]) == 0
    cfg = json.loads((out / "config.json").read_text())["d2dmoe"]
    assert cfg["top_k"] == 4 and cfg["num_experts"] == [16, 16]          # k = 25% of 16 experts
    report = json.loads((out / "d2dmoe_report.json").read_text())
    assert report["method"] == "moefication" and report["ffn_fraction"] == pytest.approx(0.25, abs=0.02)
    result = run_vllm(tmp_path, out, report=True)
    check_against_reference(result, dense_dir("gpt2", "relu"), out, 0.0)


@pytest.mark.parametrize("activation", ["keep", "anneal"])
def test_sparsify_from_the_own_activation(dense_dir, tmp_path, activation):
    """``--sparsify-activation keep`` on a Gemma: fine-tuned with the GELU-tanh gate kept (the exported config
    and the expert layers say gelu_tanh, not relu); ``anneal``: blended into ReLU by half the steps, exported
    ReLU-fied. Either way (distilled from the original, as the GPU recipe does) the Hoyer term falls, and the
    original model is measured beside the fine-tuned one."""
    out = tmp_path / "moe"
    args = [str(dense_dir("gemma3_text")), str(out), "--sparsify-steps", "6", "--sparsify-batch", "4", "--warmup", "2",
            "--sparsify-lr", "1e-3", "--hoyer-alpha", "0.05", "--save-every", "3", "--budget", "0.5",
            "--sparsify-activation", activation, "--sparsify-distill", "0.5", *FAST]   # the recipe distils
    assert convert_cli(args) == 0
    log = json.loads((tmp_path / "moe.work" / "sparsify" / "stage.json").read_text())["log"]
    assert len(log) == 6 and log[-1]["hoyer"] < log[0]["hoyer"]
    want = "gelu_tanh" if activation == "keep" else "relu"
    if activation == "anneal":
        assert [r["relu_blend"] for r in log] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1, 1])
        assert log[-1]["zero_fraction"] > 0.3                                # exact zeros: ReLU by the end
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_activation"] == "relu") == (activation == "anneal") and cfg["d2dmoe"]["activation"] == want
    report = json.loads((out / "d2dmoe_report.json").read_text())
    assert report["activation"] == want and report["ppl_original"] != report["ppl_dense"]
    assert 0.35 < report["ffn_fraction"] <= 0.5 + 1e-6


def test_sparsify_activation_keys_the_stage():
    """The paper's ReLU leaves the sparsify fingerprint as it was (pinned in test_teacher_text); keep changes it."""
    relu, keep = SparsifyOptions(steps=6).stage_key(), SparsifyOptions(steps=6, activation="keep").stage_key()
    assert "activation" not in relu and keep == {**relu, "activation": "keep"}
    assert SparsifyOptions(steps=6).relu and not SparsifyOptions(steps=6, activation="keep").relu
    assert SparsifyOptions(steps=6, activation="anneal").relu              # ends ReLU-fied
    assert SparsifyOptions(steps=6, activation="anneal").stage_key()["activation"] == "anneal"
    assert SparsifyOptions(steps=6, activation="anneal").stage_key()["anneal_share"] == 0.5
    # the teacher's text does not depend on what the student's activation is
    assert SparsifyOptions(steps=6, generated=0.5, activation="keep").text_key() == \
        SparsifyOptions(steps=6, generated=0.5).text_key()
    assert not SparsifyOptions(steps=0).relu


@pytest.mark.parametrize("extra,message", [
    (["--relu", "--sparsify-steps", "2", "--sparsify-activation", "keep"], "--relu with --sparsify-activation keep"),
    (["--budget", "1.5"], "--budget 1.5 is out of range"),
    (["--budget", "0"], "--budget 0.0 is out of range"),
    (["--method", "moefication"], "--method moefication needs --budget"),
    (["--sparsify-steps", "100000", "--sparsify-batch", "64"], "the corpus gives"),
    (["--router-steps", "-1"], "--router-steps must be >= 0"),
    (["--sparsify-distill", "1.5"], "--sparsify-distill is a weight in [0, 1]"),
    (["--sparsify-passes", "0"], "--sparsify-passes must be positive"),
    (["--tau-per-layer"], "--tau-per-layer calibrates a D2DMoE tau per layer to a compute budget"),
    (["--tau-per-layer", "--budget", "0.5", "--method", "moefication"], "it needs --budget and --method d2dmoe"),
    (["--tau-per-layer", "--budget", "0.5", "--sensitivity-tokens", "0"], "--sensitivity-tokens must be positive"),
])
def test_bad_options_write_nothing(dense_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert convert_cli([str(dense_dir("gpt2")), str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []                                   # no output, no work dir


def test_small_user_corpus_is_refused(dense_dir, tmp_path, capsys):
    text = tmp_path / "tiny.txt"
    text.write_text("Only a few words of text here. " * 5)
    out = tmp_path / "out"
    assert convert_cli([str(dense_dir("gpt2")), str(out), "--corpus", str(text)]) == 2
    err = capsys.readouterr().err
    assert "the corpus gives" in err and "Fix:" in err
    assert not out.exists() and not (tmp_path / "out.work").exists()


def test_unreadable_input_is_refused(tmp_path, capsys):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file")
    assert convert_cli([str(bad), str(tmp_path / "out")]) == 2
    assert "Fix:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()
