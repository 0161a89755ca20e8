"""Teacher text for the sparsify stage: which rows, sampled from the teacher's own distribution,
resumable, and wired into d2dmoe-convert with its own stage."""

import json

import pytest
import torch

from d2dmoe_converter import teacher_text as tt
from d2dmoe_converter.cli import main as convert_cli
from d2dmoe_converter.dense import load_dense
from d2dmoe_converter.hf_model import build_model
from d2dmoe_converter.sparsify import SparsifyOptions
from test_pipeline import FAST

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


PROMPT = [EOS, 464, 3290, 318, 257]


def check_teachers_distribution(teacher, first: torch.Tensor) -> None:
    """``first``: first tokens sampled after PROMPT. At temperature 1 with no top-k / top-p their mean
    log-probability under the teacher is its entropy's negative (within 4 standard errors; a top-k of 50,
    transformers' default, or a temperature of 0.7 fails this), and end-of-text is never sampled."""
    n = first.shape[0]
    prompt = torch.tensor([PROMPT])
    with torch.no_grad():
        logp = torch.log_softmax(teacher(input_ids=prompt).logits[0, -1].float(), -1)
    p = logp.exp()
    p_no_eos = p.clone()
    p_no_eos[EOS] = 0
    logq = torch.log(p_no_eos / p_no_eos.sum())
    entropy = -(p_no_eos / p_no_eos.sum() * logq.clamp_min(-1e4)).sum()
    picked = logq[first]
    assert torch.isfinite(picked).all() and (first != EOS).all()
    se = picked.std() / n ** 0.5
    assert abs(picked.mean() + entropy) < 4 * se, (picked.mean().item(), -entropy.item(), se.item())
    assert len(set(first.tolist())) > 50                                    # not a top-50 truncation


def test_samples_follow_the_teachers_distribution(teacher):
    """transformers' engine samples the teacher's distribution; a seed repeats its samples."""
    prompt = torch.tensor([PROMPT]).repeat(600, 1)
    check_teachers_distribution(teacher, tt.sample_transformers(teacher, prompt, 1, seed=3, eos=[EOS], batch=200)[:, 0])
    again = tt.sample_transformers(teacher, prompt[:8], 6, seed=3, eos=[EOS], batch=4)
    assert again.shape == (8, 6) and (again != EOS).all()
    assert torch.equal(again, tt.sample_transformers(teacher, prompt[:8], 6, seed=3, eos=[EOS], batch=4))
    assert not torch.equal(again, tt.sample_transformers(teacher, prompt[:8], 6, seed=4, eos=[EOS], batch=4))


def test_vllm_engine_samples_the_teacher(teacher, dense_dir, tmp_path, monkeypatch):
    """The GPU engine, run here on vLLM's CPU backend: every pending chunk sampled by one engine in a
    subprocess, from the model's own distribution (no generation-config defaults), fixed-length
    continuations without end-of-text after the kept prompt."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)   # the kernel tests' switch: not for the engine
    monkeypatch.setattr(tt, "CHUNK", 400)
    seqs = torch.cat([torch.tensor([PROMPT]).repeat(600, 1), torch.zeros(600, 4, dtype=torch.long)], dim=1)
    out = tt.teacher_text(seqs, 1.0, len(PROMPT), 3, tmp_path, engine="vllm", model_dir=dense_dir("gemma3_text"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk_0000.safetensors", "chunk_0001.safetensors"]
    assert torch.equal(out[:, :len(PROMPT)], seqs[:, :len(PROMPT)]) and (out[:, len(PROMPT):] != EOS).all()
    check_teachers_distribution(teacher, out[:, len(PROMPT)])


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
    calls.clear()
    assert torch.equal(tt.teacher_text(seqs, 0.5, 4, 0, tmp_path, engine="transformers", model=teacher, eos=[EOS]), out)
    assert calls == [1]
    with pytest.raises(ValueError, match=r"--sparsify-generated-prompt must be in \[1, 11\]"):
        tt.teacher_text(seqs, 0.5, 12, 0, tmp_path, engine="transformers", model=teacher, eos=[EOS])


def test_no_teacher_text_keeps_the_sparsify_fingerprint_of_before():
    before = {"steps", "batch", "accum", "seq_len", "lr", "warmup", "alpha", "clip", "save_every", "distill", "passes"}
    assert set(SparsifyOptions(steps=6).stage_key()) == before
    assert set(SparsifyOptions(steps=6, generated=0.5).stage_key()) == before | {"generated", "generated_prompt"}


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
    assert convert_cli([*args, "--overwrite"]) == 0                         # a rerun reuses both stages
    printed = capsys.readouterr().out
    assert "[teacher_text] done earlier" in printed and "[sparsify] done earlier" in printed


@pytest.mark.parametrize("extra,message", [
    (["--sparsify-generated", "1.5"], "--sparsify-generated is a share of the sequences in [0, 1]"),
    (["--sparsify-generated", "0.5", "--sparsify-generated-prompt", "128"], "--sparsify-generated-prompt must be in"),
])
def test_bad_teacher_text_options_write_nothing(dense_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert convert_cli([str(dense_dir("gpt2")), str(out), "--sparsify-steps", "2", "--seq-len", "128", *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
