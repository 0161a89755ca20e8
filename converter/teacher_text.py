"""Distillation text sampled from the original model: continuations of the training text's openings.

More sparsify steps over the same corpus narrow the student toward that text (session 40, docs/converter.md
"Training longer: measured": train KL -42%, held-out gap unchanged, other corpora worse): the limit is
distinct text, and the teacher supplies it without bound. A share ``generated`` of the sparsify stage's
sequences keeps its first ``prompt`` tokens and the rest is sampled from the original model (temperature
1, no top-k / top-p: the teacher's own distribution; end-of-text suppressed so every sequence keeps its
length). A training sequence read again (passes > 1) gets another continuation, so the steps see distinct text.

Engines (``--sparsify-generated-engine``, default auto): vLLM when it is installed and the stage runs on a
GPU (batched sampling; in a subprocess, so its GPU memory is free again before training), else transformers'
``generate`` (CPU, tests). Continuations are saved in chunks as they finish: an interrupted stage resumes.
On an H100 (session 43, ``benchmarks/profile_teacher_text.py``) vLLM with CUDA graphs samples 17.2k tokens/s
after a ~100 s start, transformers 7.6k; a vLLM decode step costs ~56 us per sequence whatever the batch,
most likely the engine's host work per request, so ``--engines N`` runs N engines side by side on the GPU,
each on a share of the chunks (started one after another: vLLM's memory profiling must not see another
engine start), to spread that host work over N processes. Not yet measured on a GPU.

    python -m d2dmoe_converter.teacher_text MODEL_DIR JOBS.safetensors OUT_DIR --new-tokens N [--engines K]
runs the vLLM engine(s) over the pending chunks (what ``sample_vllm`` starts).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

CHUNK = 1024  # sequences per saved chunk: a call cut at its time limit loses at most one chunk's sampling


def save_chunk(cont: torch.Tensor, path: Path) -> None:
    """Written whole or not at all (a call cut at its time limit must not leave half a chunk behind)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({"continuations": cont.contiguous()}, str(tmp))
    os.replace(tmp, path)


def check_share(share: float) -> None:
    if not 0 <= share <= 1:
        raise ValueError(f"--sparsify-generated is a share of the sequences in [0, 1], got {share}")


def check_prompt(prompt: int, seq_len: int) -> None:
    if not 0 < prompt < seq_len:
        raise ValueError(f"--sparsify-generated-prompt must be in [1, {seq_len - 1}] (below --seq-len {seq_len}), "
                         f"got {prompt}")


def generated_rows(n: int, share: float, seed: int) -> torch.Tensor:
    """The ``round(share * n)`` of ``n`` sequences to continue with teacher text, spread over the
    run by a seeded permutation, in order."""
    check_share(share)
    count = round(share * n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].sort().values


ENGINES = ("auto", "vllm", "transformers")


def engine_for(device: torch.device, want: str = "auto") -> str:
    """``want``, or for "auto": vLLM on a GPU where it is installed, else transformers."""
    if want not in ENGINES:
        raise ValueError(f"teacher-text engine {want!r}: expected one of {', '.join(ENGINES)}")
    # found, not imported: importing vLLM rewrites this process's environment (its env overrides), and the
    # training that follows runs here; the subprocess imports it
    have_vllm = importlib.util.find_spec("vllm") is not None
    if want == "vllm" and not have_vllm:
        raise ValueError("teacher-text engine vllm: vLLM is not installed. Fix: install it (pip install vllm; "
                         "on the CPU, vLLM's CPU build), or choose the transformers engine")
    if want != "auto":
        return want
    return "vllm" if device.type == "cuda" and have_vllm else "transformers"


def sample_transformers(model, prompts: torch.Tensor, new_tokens: int, seed: int, eos: list[int],
                        batch: int = 64) -> torch.Tensor:
    """[n, new_tokens] tokens sampled from ``model`` after each row of ``prompts`` (transformers'
    ``generate``; ``eos`` never sampled)."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    cfg = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, eos_token_id=eos, pad_token_id=eos[0])
    out = []
    for i in range(0, prompts.shape[0], batch):
        torch.manual_seed(seed + i)
        ids = prompts[i : i + batch].to(device)
        with torch.no_grad():
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        out.append(seq[:, ids.shape[1]:].cpu())
    return torch.cat(out)


def visible_device(index: int, visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for the child that sees only this process's ``cuda:index``: the index-th of
    the devices this process sees (a mask it was started with maps its indices onto other GPUs)."""
    if not visible:
        return str(index)
    devices = [d.strip() for d in visible.split(",") if d.strip()]
    if index >= len(devices):
        raise ValueError(f"--device cuda:{index}: CUDA_VISIBLE_DEVICES={visible} shows {len(devices)} GPU(s)")
    return devices[index]


def sample_vllm(model_dir: Path, jobs: dict[str, torch.Tensor], new_tokens: int, seed: int, part: Path,
                eos: list[int], device: torch.device | None = None, engines: int = 1) -> None:
    """``sample_transformers`` through vLLM for every pending chunk (``jobs``: file name -> prompts), one
    engine (or ``engines`` side by side) in a subprocess (``main`` below) that writes each chunk's file into
    ``part`` as it finishes.
    The engine is seeded, its rows are not (a seed per request makes vLLM draw row by row), so a
    resumed stage's new chunks are not those an uninterrupted run would have drawn."""
    src = part / "pending.safetensors"
    save_file({name: prompts.contiguous() for name, prompts in jobs.items()}, str(src))
    cmd = [sys.executable, "-m", "d2dmoe_converter.teacher_text", str(model_dir), str(src), str(part),
           "--new-tokens", str(new_tokens), "--seed", str(seed), "--eos", ",".join(map(str, eos))]
    # on the GPU, CUDA graphs for every batch up to a chunk decoded at once: 17.2k against eager's 9.7k tokens/s on
    # an H100 (session 43, benchmarks/results/profile-teacher-text-*.json), for a start ~70 s longer (compiling
    # and capturing); on vLLM's CPU backend (tests), eager in fp32
    cmd += ["--graphs", "--max-num-seqs", str(CHUNK)] if torch.cuda.is_available() else ["--dtype", "float32"]
    if engines > 1:
        cmd += ["--engines", str(engines)]
    env = dict(os.environ)
    if device is not None and device.type == "cuda" and device.index is not None:  # --device cuda:N
        env["CUDA_VISIBLE_DEVICES"] = visible_device(device.index, os.environ.get("CUDA_VISIBLE_DEVICES"))
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"teacher text: the vLLM sampler failed (exit {done.returncode}; its log is above). "
                           f"Fix: resolve that error, or sample with transformers' generate instead "
                           f"(d2dmoe-convert --sparsify-generated-engine transformers)")
    src.unlink()


def teacher_text(seqs: torch.Tensor, share: float, prompt: int, seed: int, part: Path, *, engine: str,
                 eos: list[int], model=None, model_dir: Path | None = None,
                 device: torch.device | None = None, engines: int = 1) -> torch.Tensor:
    """``seqs`` with the rows ``generated_rows`` picks continued by the teacher after their first ``prompt``
    tokens, ``eos`` never sampled; finished chunks are kept in ``part`` (resume). transformers needs
    ``model``, vLLM ``model_dir`` (the original model as a Hugging Face directory; ``device`` its GPU)."""
    n, length = seqs.shape
    check_prompt(prompt, length)
    rows = generated_rows(n, share, seed)
    chunks = {f"chunk_{c:04d}": (rows[start : start + CHUNK], seed + start)
              for c, start in enumerate(range(0, len(rows), CHUNK))}
    pending = {name: (seqs[r, :prompt], s) for name, (r, s) in chunks.items()
               if not (part / f"{name}.safetensors").is_file()}
    if pending and engine == "vllm":
        sample_vllm(model_dir, {name: p for name, (p, _) in pending.items()}, length - prompt, seed, part, eos, device,
                    engines)
    elif pending:
        for name, (prompts, s) in tqdm(pending.items(), desc="teacher text (transformers)"):
            save_chunk(sample_transformers(model, prompts, length - prompt, s, eos), part / f"{name}.safetensors")
    out = seqs.clone()
    for name, (r, _) in chunks.items():
        out[r, prompt:] = load_file(str(part / f"{name}.safetensors"))["continuations"].to(out.dtype)
    return out


MEMORY = 0.6   # the share of GPU memory the sampling engines take together


def engine_options(dtype: str, seed: int, length: int, max_num_seqs: int | None = None, graphs: bool = False,
                   memory: float = MEMORY) -> dict:
    """vLLM ``LLM`` keywords of the sampling engine: the model's own distribution (no generation-config
    defaults), token ids in and out (no tokenizer loaded), eager unless ``graphs``, then CUDA graphs for every
    batch up to ``max_num_seqs`` (or a chunk); ``memory``: its share of the GPU's memory."""
    opts = dict(dtype=dtype, seed=seed, generation_config="vllm", max_model_len=length, gpu_memory_utilization=memory,
                enable_prefix_caching=False, skip_tokenizer_init=True, enforce_eager=not graphs)
    if max_num_seqs:
        opts["max_num_seqs"] = max_num_seqs
    if graphs:
        top = max_num_seqs or CHUNK
        opts["compilation_config"] = {"cudagraph_capture_sizes": sorted({1, 2, 4, 8, *range(16, top + 1, 16)})}
    return opts


def print_timing(t0: float, started: float, tokens: int, **extra) -> None:
    """The line the profile (benchmarks/profile_teacher_text.py) reads from an engine's process: seconds to
    start (from ``t0`` to ``started``) and to sample ``tokens`` (from ``started`` to now), and ``extra``."""
    done = time.perf_counter()
    print("[teacher-text] " + json.dumps({"start_s": round(started - t0, 2), "sample_s": round(done - started, 2),
                                          "tokens": tokens, "tokens_per_s": round(tokens / (done - started), 1),
                                          **extra}),
          flush=True)


def split_jobs(names: list[str], engines: int) -> list[list[str]]:
    """The chunks round robin over ``engines`` engines (fewer where there are fewer chunks)."""
    names = sorted(names)
    return [names[k::engines] for k in range(min(engines, len(names)))]


READY = "[teacher-text] ready"


def coordinate(args: argparse.Namespace) -> int:
    """``--engines K``: K copies of this command, each with its share of the chunks (``split_jobs``), seed + k
    and 1/K of the memory, each started once the one before printed READY (its engine is up: vLLM's memory
    profiling at start must not see another engine allocate), their output passed through; then the timing
    line of them all (start: to the first engine's READY; sampling: from there to the last engine's end)."""
    t0 = time.perf_counter()
    jobs = load_file(str(args.jobs))
    groups = split_jobs(list(jobs), args.engines)
    procs, threads, ready_at = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for k, names in enumerate(groups):
            path = Path(tmp) / f"jobs_{k}.safetensors"
            save_file({n: jobs[n] for n in names}, str(path))
            cmd = [sys.executable, "-m", "d2dmoe_converter.teacher_text", *engine_args(args, k, len(groups), path)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
            ready, up = threading.Event(), []

            def relay(proc=proc, ready=ready, up=up, k=k):
                for line in proc.stdout:
                    sys.stdout.write(f"[engine {k}] {line}")
                    if line.startswith(READY):
                        up.append(True)
                        ready.set()
                ready.set()   # its output ended without READY: it did not come up

            thread = threading.Thread(target=relay, daemon=True)
            thread.start()
            procs.append(proc)
            threads.append(thread)
            ready.wait()
            if not up:
                break    # this engine did not come up: start no more (its exit code is reported below)
            ready_at.append(time.perf_counter())
        codes = [proc.wait() for proc in procs]
        for thread in threads:
            thread.join()
    sys.stdout.flush()
    failed = [k for k, c in enumerate(codes) if c != 0]
    if failed:
        print(f"[teacher-text] engine(s) {failed} failed (exit {[codes[k] for k in failed]})", file=sys.stderr)
        return 1
    tokens = sum(jobs[n].shape[0] for names in groups for n in names) * args.new_tokens   # each engine checks its shapes
    print_timing(t0, ready_at[0], tokens, engines_ready_s=[round(t - t0, 2) for t in ready_at])   # each one's READY
    return 0


def engine_args(args: argparse.Namespace, k: int, n: int, jobs: Path) -> list[str]:
    """Engine k of n's arguments: its jobs file, seed + k, 1/n of the memory, one engine."""
    out = [str(args.model_dir), str(jobs), str(args.out_dir), "--new-tokens", str(args.new_tokens),
           "--seed", str(args.seed + k), "--eos", args.eos, "--dtype", args.dtype,
           "--gpu-memory-utilization", str(args.gpu_memory_utilization / n)]
    if args.max_num_seqs:
        out += ["--max-num-seqs", str(args.max_num_seqs)]
    return out + (["--graphs"] if args.graphs else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Sample continuations of token prompts from a model with vLLM "
                                 "(the teacher-text stage's GPU engine)")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("jobs", type=Path, help="safetensors: one [n, p] tensor of prompt ids per chunk")
    ap.add_argument("out_dir", type=Path, help="where each chunk's 'continuations' [n, new_tokens] is written, "
                    "as NAME.safetensors")
    ap.add_argument("--new-tokens", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eos", default="", help="comma-separated token ids never to sample (end-of-text)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="sequences the engine decodes at once (default vLLM's: 1,024 on an H100 / H200)")
    ap.add_argument("--graphs", action="store_true",
                    help="compile and capture CUDA graphs up to --max-num-seqs (or a chunk's 1,024) sequences "
                         "(vLLM's default graphs stop at 512 sequences, below a chunk); the converter passes it on "
                         "the GPU. Default eager")
    ap.add_argument("--engines", type=int, default=1,
                    help="engines side by side on the GPU, each on a share of the chunks (default 1)")
    ap.add_argument("--gpu-memory-utilization", type=float, default=MEMORY,
                    help=f"share of the GPU's memory for the engine(s) together (default {MEMORY})")
    args = ap.parse_args(argv)
    if args.engines < 1:
        ap.error(f"--engines {args.engines}: give at least 1")
    if args.engines > 1:
        return coordinate(args)
    t0 = time.perf_counter()
    # FlashInfer's sampler is JIT-compiled at the engine's first start on a bare machine: ~2 min (ENVIRONMENT.md:
    # engine init 124 s with it, 36 s without; session 42's first run: 140 s); plain sampling needs none of it
    os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    jobs = load_file(str(args.jobs))
    length = next(iter(jobs.values())).shape[1] + args.new_tokens
    llm = LLM(str(args.model_dir), **engine_options(args.dtype, args.seed, length, args.max_num_seqs, args.graphs,
                                                     args.gpu_memory_utilization))
    print(READY, flush=True)
    started, tokens = time.perf_counter(), 0
    for name, prompts in sorted(jobs.items()):
        # min_tokens = max_tokens: --eos (the stop ids: the model config's end-of-text ids) are never sampled,
        # as transformers' min_new_tokens does for the same ids; ignore_eos for any other the engine knows
        params = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=args.new_tokens, min_tokens=args.new_tokens,
                                ignore_eos=True, stop_token_ids=[int(i) for i in args.eos.split(",") if i],
                                detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p.tolist()) for p in prompts], params)
        cont = torch.tensor([list(o.outputs[0].token_ids) for o in outs], dtype=torch.long)
        if cont.shape != (prompts.shape[0], args.new_tokens):
            raise RuntimeError(f"vLLM returned continuations of shape {tuple(cont.shape)}, "
                               f"not {(prompts.shape[0], args.new_tokens)}")
        save_chunk(cont, args.out_dir / f"{name}.safetensors")
        tokens += cont.numel()
    print_timing(t0, started, tokens)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
