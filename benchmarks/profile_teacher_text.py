"""How fast the teacher text is sampled on the GPU, by engine, before anyone asks it for 12M tokens.

    python benchmarks/profile_teacher_text.py --out $OUT --variants vllm-eager,transformers-1024   # ~4 min, H100
    python benchmarks/profile_teacher_text.py --out $OUT --variants vllm-graphs                   # ~4 min
    python benchmarks/profile_teacher_text.py --smoke --out /tmp/prof     # the same code path on the CPU, tiny model

Session 42's first GPU run of the sparsify stage's teacher text (3,840 continuations of 480 tokens from Gemma 3
270M, ``--generated 0.5`` at 480 steps) took 407 s: 140 s for vLLM's engine to start and 182 s of sampling,
10k tokens/s (eager, chunks of 1,024 sequences: ~95 ms a decode step). A 270M model's decode step over 1,024
sequences is a few ms of GPU work, so most of that is elsewhere, and teacher text at the scale that would
matter (1600 steps, all of the text: 12M tokens) would take 20 min at that speed. This script times the
engines on a model of that shape with random weights (a step's cost does not depend on the values; the
sampling is over the whole 262k vocabulary either way), saved as a Hugging Face directory both load, each
variant in its own process (fresh GPU memory; vLLM's environment kept out of the others):

- ``vllm-eager``: the converter's engine as it was until session 43 (``python -m d2dmoe_converter.teacher_text``:
  eager, vLLM's default number of sequences at once, 1,024 on an H100 / H200: a whole chunk);
- ``vllm-eager-256``: the same with ``--max-num-seqs 256`` (4 waves a chunk: is the step's host work per
  sequence?);
- ``vllm-graphs``: compiled, with CUDA graphs up to 1,024 sequences (``--graphs --max-num-seqs 1024``; the
  converter's engine on the GPU since session 43, which measured it at 1.76x eager's tokens/s on an H100:
  ``benchmarks/results/profile-teacher-text-nvidia-h100-80gb-hbm3.json``, docs/converter.md);
- ``vllm-graphs-x2`` / ``vllm-graphs-x4``: 2 or 4 such engines side by side (``--engines N``, the converter's
  ``--sparsify-generated-engines``), each on a chunk of 1,024 (so N x the sequences; x4 with 80% of the GPU's
  memory in all). Session 43 measured a decode step at ~56 us a sequence whatever the batch: if that is each
  engine's host work, N engines sample up to N times the tokens a second;
- ``transformers-1024`` / ``transformers-64``: ``generate`` (the converter's other engine) with 1,024
  sequences a batch or 64 (its present default; ~7.7k decode steps a chunk, so not in the default list).

Per variant: seconds to start (engine or model load) and to sample, tokens per second. Prints a table and
writes ``profile-teacher-text-<device>.json`` after every variant (a call cut at its time limit keeps the
finished ones); the default list (all but transformers-64) takes longer than one 10-minute device call, so
run it in two, as above.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from profile_sparsify import GEMMA3_270M, TINY
from provenance import provenance

VARIANTS = {  # name -> (engine, its options)
    "vllm-eager": ("vllm", []),
    "vllm-eager-256": ("vllm", ["--max-num-seqs", "256"]),
    "vllm-graphs": ("vllm", ["--graphs", "--max-num-seqs", "1024"]),
    "vllm-eager-x2": ("vllm", ["--engines", "2"]),   # the CPU smoke run's side-by-side engines
    "vllm-graphs-x2": ("vllm", ["--graphs", "--max-num-seqs", "1024", "--engines", "2"]),
    "vllm-graphs-x4": ("vllm", ["--graphs", "--max-num-seqs", "1024", "--engines", "4", "--gpu-memory-utilization", "0.8"]),
    "transformers-1024": ("transformers", ["1024"]),
    "transformers-64": ("transformers", ["64"]),
}
DEFAULT = ("vllm-eager", "vllm-eager-256", "vllm-graphs", "transformers-1024")
LINE = re.compile(r"^\[teacher-text\] (\{.*\})$", re.M)
ENGINE_LINE = re.compile(r"^\[engine (\d+)\] \[teacher-text\] (\{.*\})$", re.M)   # side-by-side engines' own


def save_model(config: dict, path: Path) -> None:
    """Gemma 3 of ``config``'s shape, random weights, as the Hugging Face directory both engines load."""
    from d2dmoe_converter.hf_model import empty_model

    torch.manual_seed(0)
    empty_model(config).to(torch.bfloat16).save_pretrained(path)


def save_jobs(path: Path, sequences: int, chunk: int, prompt: int, vocab: int) -> None:
    """The prompts, in chunks as the converter hands them to the vLLM engine (random ids past id 10, so
    none is an end-of-text id)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, vocab, (sequences, prompt), generator=g)
    save_file({f"chunk_{c:04d}": ids[s : s + chunk].contiguous() for c, s in enumerate(range(0, sequences, chunk))},
              str(path))


def worker_transformers(model_dir: Path, jobs: Path, new_tokens: int, batch: int, dtype: str) -> None:
    """The transformers engine over the same chunks (``--worker``), printing the same timing line as vLLM's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from d2dmoe_converter.teacher_text import print_timing, sample_transformers

    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).to(device).eval()
    started, tokens = time.perf_counter(), 0
    for name, prompts in sorted(load_file(str(jobs)).items()):
        tokens += sample_transformers(model, prompts, new_tokens, seed=0, eos=[1], batch=batch).numel()
    if device == "cuda":
        torch.cuda.synchronize()
    print_timing(t0, started, tokens)


def engines_of(name: str) -> int:
    """How many engines a variant runs side by side (each on a chunk of its own)."""
    extra = VARIANTS[name][1]
    return int(extra[extra.index("--engines") + 1]) if "--engines" in extra else 1


def run_variant(name: str, model_dir: Path, jobs: Path, new_tokens: int, dtype: str, timeout: float) -> dict:
    engine, extra = VARIANTS[name]
    with tempfile.TemporaryDirectory() as out:
        if engine == "vllm":
            cmd = [sys.executable, "-m", "d2dmoe_converter.teacher_text", str(model_dir), str(jobs), out,
                   "--new-tokens", str(new_tokens), "--eos", "1", "--dtype", dtype, *extra]
        else:
            cmd = [sys.executable, __file__, "--worker", str(model_dir), str(jobs), str(new_tokens), extra[0], dtype]
        t0 = time.perf_counter()
        # its own process group: a timed-out variant goes with its children (vLLM's engine core holds the GPU)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"variant": name, "error": f"timed out after {timeout:.0f} s"}
        wall = round(time.perf_counter() - t0, 1)
    found = LINE.findall(stdout)
    if proc.returncode != 0 or not found:
        return {"variant": name, "wall_s": wall, "error": f"exit {proc.returncode}: {stderr[-1500:]}"}
    row = {"variant": name, "wall_s": wall, **json.loads(found[-1])}
    each = ENGINE_LINE.findall(stdout)
    if each:   # each engine's own start and sampling (its sampling overlaps the others' starts and sampling)
        row["per_engine"] = [{"engine": int(k), **json.loads(line)} for k, line in each]
    return row


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        model_dir, jobs, new_tokens, batch, dtype = sys.argv[2:7]
        worker_transformers(Path(model_dir), Path(jobs), int(new_tokens), int(batch), dtype)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny model and counts: the code path on the CPU")
    ap.add_argument("--variants", default=",".join(DEFAULT),
                    help=f"comma-separated, of {', '.join(VARIANTS)} (default {','.join(DEFAULT)})")
    ap.add_argument("--sequences", type=int, default=1024, help="continuations sampled (default 1024: one chunk)")
    ap.add_argument("--new-tokens", type=int, default=480, help="tokens each (default 480, the recipe's)")
    ap.add_argument("--timeout", type=float, default=420, help="seconds a variant may take (default 420)")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        raise SystemExit(f"[profile] --variants {args.variants!r}: expected some of {', '.join(VARIANTS)}")
    if not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("[profile] no GPU here: run it through the device tool, or --smoke for the CPU code path")
    config, dtype = (TINY, "float32") if args.smoke else (GEMMA3_270M, "bfloat16")
    sequences, new_tokens, chunk = (8, 8, 4) if args.smoke else (args.sequences, args.new_tokens, 1024)
    args.out.mkdir(parents=True, exist_ok=True)
    device = provenance()["device"]
    path = args.out / f"profile-teacher-text-{re.sub(r'[^a-z0-9]+', '-', device.lower()).strip('-')}" \
                      f"{'-smoke' if args.smoke else ''}.json"
    doc = {**provenance(), "model": "Gemma 3 270M shape, random weights" if not args.smoke else "tiny Gemma 3",
           "sequences": sequences, "prompt": 32, "new_tokens": new_tokens, "chunk": chunk, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        save_model(config, model_dir)
        for name in variants:
            n = engines_of(name)   # N engines: N x the sequences, a chunk each, as the converter would hand them
            jobs = Path(tmp) / f"jobs-x{n}.safetensors"
            if not jobs.exists():
                save_jobs(jobs, sequences * n, chunk, 32, config["vocab_size"])
            doc["rows"].append({**run_variant(name, model_dir, jobs, new_tokens, dtype, args.timeout), "engines": n})
            path.write_text(json.dumps(doc, indent=1))   # after every variant: a cut call keeps the finished ones
            print(f"[profile] {json.dumps(doc['rows'][-1])[:400]}", flush=True)
    rows = doc["rows"]
    print(f"{'variant':20} {'start s':>8} {'sample s':>9} {'tokens/s':>10} {'wall s':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:20} error: {r['error'][:200]}")
        else:
            print(f"{r['variant']:20} {r['start_s']:8.1f} {r['sample_s']:9.1f} {r['tokens_per_s']:10.0f} {r['wall_s']:7.1f}")
    print(f"[profile] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
