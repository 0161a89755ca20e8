"""Where a sparsify step's time goes on the GPU (device tool), before anyone trains longer.

    python benchmarks/profile_sparsify.py --out $OUT                  # ~2 min on an H100
    python benchmarks/profile_sparsify.py --smoke --out /tmp/prof     # the same code path on the CPU, tiny model

The GPU recipe's sparsify stage (Gemma 3 270M, 16 x 512 tokens a step, distilled from the original model)
ran 188 s for 480 steps on an H200 and 221 s on an H100: ~0.4 s a step, about ten times what its FLOPs
(~17 TFLOP: student forward + backward, teacher forward, two 262k-vocabulary LM heads) take at ~400 TFLOP/s
(40% of the bf16 peak; 25 times at the peak).
The authors trained ~250 times more tokens. This script times ``finetune`` itself on a model of that shape
with random weights (a step's cost does not depend on the values, so no GGUF is needed) and random token
ids, with the recipe's options, in variants:

- ``base``: the code as it is (eager attention, as ``build_model`` builds it; one host sync per step; the
  distillation KL in one Triton pass pair over the logits, ``d2dmoe_converter.distill_kl``, since session 40);
- ``torch-kl``: the KL as the torch reference computes it (chunks of 1024 positions in fp32: the step
  session 40 profiled at 337 ms on an H100);
- ``per-layer-sync``: the host sync in every layer's ReLU that the step had before session 39, added back (the
  old step's other syncs, one per loss term and the grad norm, are not);
- ``sdpa``: student and teacher with PyTorch's scaled-dot-product attention instead of eager;
- ``frozen-embedding``: the tied embedding / LM head left out of training (170M of the 270M parameters);
- ``compile``: student and teacher through ``torch.compile`` (default mode; the compile falls in the warm-up
  steps): what fusing the step's element-wise passes (norms, casts, the ReLU's Hoyer terms) buys.

Per variant: median wall seconds per step after ``--warmup`` steps (``finetune`` logs each step's time),
tokens per second; then ``torch.profiler`` over two ``base`` steps (after a first one): the kernels with the most device time,
and host against device totals. Prints a table and writes ``profile-sparsify-<device>.json``.
"""

import argparse
import contextlib
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import gpu_convert_recipe
from provenance import provenance

GEMMA3_270M = dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                   num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                   max_position_embeddings=32768, sliding_window=512, query_pre_attn_scalar=256,
                   hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True)
TINY = dict(GEMMA3_270M, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            head_dim=32, vocab_size=512, sliding_window=16, query_pre_attn_scalar=32)
RECIPE = {k: v for k, v in gpu_convert_recipe.RECIPE["sparsify"].items() if k not in ("steps", "save_every")}
VARIANTS = ("base", "torch-kl", "per-layer-sync", "sdpa", "frozen-embedding", "compile")


def build(config: dict, attention: str, device: str) -> torch.nn.Module:
    """The model ``build_model`` builds for the converter (fp32 weights), with its initial random values."""
    from d2dmoe_converter.hf_model import empty_model

    torch.manual_seed(0)
    return empty_model(config, attention).to(device).eval()


@contextlib.contextmanager
def per_layer_sync():
    """The pre-session-39 HoyerReLU (now HoyerActivation): its zero fraction read to the host in every layer's forward."""
    from d2dmoe_converter import sparsify

    forward = sparsify.HoyerActivation.forward

    def syncing(self, x):
        a = forward(self, x)
        if self.training:
            float(self.zero_fraction)
        return a

    sparsify.HoyerActivation.forward = syncing
    try:
        yield
    finally:
        sparsify.HoyerActivation.forward = forward


@contextlib.contextmanager
def counted_kl():
    """Counts the calls of each KL implementation (what ran, not what was meant to)."""
    from d2dmoe_converter import distill_kl

    calls = {"triton": 0, "torch": 0}
    saved = distill_kl.kl_rows_triton, distill_kl.kl_rows_torch

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    distill_kl.kl_rows_triton, distill_kl.kl_rows_torch = counting("triton", saved[0]), counting("torch", saved[1])
    try:
        yield calls
    finally:
        distill_kl.kl_rows_triton, distill_kl.kl_rows_torch = saved


@contextlib.contextmanager
def torch_kl():
    """The distillation KL by the torch reference (chunked, fp32) instead of the Triton kernel."""
    from d2dmoe_converter import distill_kl

    kernel = distill_kl.kl_rows_triton
    distill_kl.kl_rows_triton = lambda student, teacher: distill_kl.kl_rows_torch(student, teacher)
    try:
        yield
    finally:
        distill_kl.kl_rows_triton = kernel


def run_variant(name: str, config: dict, steps: int, device: str, work: Path, profile: bool = False) -> dict:
    from d2dmoe_converter.sparsify import SparsifyOptions, finetune, hoyer_activations_

    attention = "sdpa" if name == "sdpa" else "eager"
    model = build(config, attention, device)
    teacher = build(config, attention, device).requires_grad_(False)
    hoyer_activations_(model)
    if name == "frozen-embedding":
        model.get_input_embeddings().weight.requires_grad_(False)
    if name == "compile":  # after hoyer_activations_: the compiled module wraps the ReLU-fied one (attributes pass through)
        model, teacher = torch.compile(model), torch.compile(teacher)
    opts = SparsifyOptions(steps=steps, save_every=10 ** 9, **RECIPE)
    if device == "cpu":
        opts = dataclasses.replace(opts, batch=2, seq_len=32)
    seqs = torch.randint(0, config["vocab_size"], (steps * opts.batch, opts.seq_len), generator=torch.Generator().manual_seed(1))
    state = work / f"{name}-{'profile' if profile else 'time'}.pt"
    guard = {"per-layer-sync": per_layer_sync, "torch-kl": torch_kl}.get(name, contextlib.nullcontext)()
    result = {"attention": model.config._attn_implementation, "trained_parameters":
              sum(p.numel() for p in model.parameters() if p.requires_grad)}
    with counted_kl() as kl_calls, guard:
        if profile:  # the steps after the first (its optimizer-state creation and library warm-up left out)
            acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
            schedule = torch.profiler.schedule(wait=0, warmup=1, active=steps - 1, repeat=1)
            with torch.profiler.profile(activities=acts, schedule=schedule) as prof:
                hook = register_optimizer_step_post_hook(lambda *a: prof.step())
                try:
                    finetune(model, seqs, opts, state, teacher)
                finally:
                    hook.remove()
            result["profile"] = profile_summary(prof, device)
        else:
            log = finetune(model, seqs, opts, state, teacher)["log"]
            result["step_seconds"] = [r["seconds"] for r in log]
            result["losses"] = [[r["task_loss"], r["hoyer"]] for r in log]   # the variants must agree on these
    result["compiled"] = isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
    result["kl_calls"] = dict(kl_calls)   # which KL implementation the steps ran: {"triton": n, "torch": n}
    del model, teacher
    if device == "cuda":
        result["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return result | {"tokens_per_step": opts.batch * opts.seq_len}


def profile_summary(prof, device: str, rows: int = 25) -> dict:
    def dev(e, total=True):  # torch >= 2.4 says device, older cuda
        name = ("" if total else "self_") + ("device_time_total" if hasattr(e, "device_time_total") else "cuda_time_total")
        return getattr(e, name, 0.0) if device == "cuda" else 0.0

    events = prof.key_averages()
    top = sorted(events, key=lambda e: dev(e, total=False) if device == "cuda" else e.self_cpu_time_total, reverse=True)
    return {"self_device_us_total": sum(dev(e, total=False) for e in events),
            "self_cpu_us_total": sum(e.self_cpu_time_total for e in events),
            "top": [{"name": e.key[:120], "calls": e.count, "self_device_us": dev(e, total=False),
                     "self_cpu_us": e.self_cpu_time_total} for e in top[:rows]]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (the first --warmup not counted)")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU allowed: checks the script, times nothing useful")
    args = ap.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    if set(variants) - set(VARIANTS):
        ap.error(f"--variants: some of {', '.join(VARIANTS)}")
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        raise SystemExit("profile_sparsify.py times the GPU recipe's step: run it on the GPU machine (or --smoke here)")
    config = TINY if args.smoke else GEMMA3_270M
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in variants:
            r = run_variant(name, config, args.steps, device, Path(tmp))
            timed = r["step_seconds"][args.warmup:]
            r["median_step_s"] = statistics.median(timed)
            r["tokens_per_s"] = r["tokens_per_step"] / r["median_step_s"]
            results[name] = r
            print(f"{name:17s} {1e3 * r['median_step_s']:9.1f} ms/step {r['tokens_per_s']:10.0f} tok/s", flush=True)
        prof = run_variant("base", config, 3, device, Path(tmp), profile=True)["profile"]
    base = results.get("base")
    print(f"\n{'variant':17s} {'ms/step':>9s} {'tok/s':>10s} {'vs base':>8s}")
    for name, r in results.items():
        ratio = base["median_step_s"] / r["median_step_s"] if base else float("nan")
        print(f"{name:17s} {1e3 * r['median_step_s']:9.1f} {r['tokens_per_s']:10.0f} {ratio:8.2f}")
    print(f"\nprofile of 2 base steps: host {prof['self_cpu_us_total'] / 1e3:.0f} ms, device {prof['self_device_us_total'] / 1e3:.0f} ms")
    for row in prof["top"][:15]:
        print(f"  {row['self_device_us'] / 1e3:9.1f} ms dev {row['self_cpu_us'] / 1e3:9.1f} ms host {row['calls']:6d}x  {row['name'][:70]}")
    doc = {**provenance(), "config": config, "recipe": RECIPE, "steps": args.steps, "warmup": args.warmup,
           "smoke": args.smoke, "variants": results, "profile_base": prof}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("profile-sparsify-" + doc["device"].replace(" ", "-").lower() + ("-smoke" if args.smoke else "") + ".json")
    path.write_text(json.dumps(doc, indent=1))
    print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
