"""GPU check of the plugin: D2DMoE GPT-2 and Gemma 3 checkpoints served by vLLM on CUDA with
torch.compile and CUDA graphs on: at tau = 0 against vLLM's dense model on the same weights, at
tau = 0.5 (the Triton kernels) against the masked torch reference; with ``--attention`` also
checkpoints whose attention projections are experts too (d_out != d_in kernels), at tau = 0 and 0.5
against the torch reference. Routers and distillation train on this repository's own text (the
GPU machine has no network), so the check needs no corpus.

    python benchmarks/gpu_check_plugin.py --tokenizer-dir DIR --out benchmarks/results

Each engine runs in its own process (tests/vllm_runner.py). Prints a table, writes JSON.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from provenance import ROOT, provenance  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = ["Hello world, this is", "The state of the union is strong because", "In 1790 George Washington",
           "Mixture of experts"] * 4


def run_engine(model, workdir, name, **llm_kwargs):
    spec, out = workdir / f"{name}.json", workdir / f"{name}.out.json"
    spec.write_text(json.dumps({"model": str(model), "prompts": PROMPTS, "max_tokens": 16, "report": True,
                                "llm_kwargs": llm_kwargs}))
    t0 = time.time()
    env = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # the compute report runs via apply_model
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "vllm_runner.py"), str(spec), str(out)],
                          capture_output=True, text=True, env=env)
    (workdir / f"{name}.log").write_text(proc.stdout + proc.stderr)
    if not out.exists():
        print(proc.stderr[-4000:])
        raise SystemExit(f"{name}: engine failed")
    res = json.loads(out.read_text())
    if "error" in res:
        raise SystemExit(f"{name}: {res['error']}")
    res["seconds"] = round(time.time() - t0, 1)
    return res


TAU = 0.5


def compare(family, against, tau, want, got, n):
    same = sum(a["tokens"] == b["tokens"] for a, b in zip(want, got["batch"]))
    diff = max(abs(p - q) for a, b in zip(want, got["batch"]) for p, q in zip(a["logprobs"], b["logprobs"]))
    return {"family": family, "tau": tau, "against": against, "prompts": n, "identical_greedy_outputs": same,
            "max_logprob_diff": diff, "executed_fraction": got["report"]["overall_fraction"],
            "engine_s": got["seconds"]}


def plain_checks(family, dense, moe, tmp, small, common, rows):
    """FFN-only checkpoint: tau = 0 against vLLM's dense model, tau > 0 against the torch reference."""
    from d2dmoe_converter.convert import ConvertOptions, convert
    from reference_model import greedy, reference_model

    convert(dense, moe, ConvertOptions(expert_size=32, **small))
    d = run_engine(dense, tmp, f"dense-{family}", **common)
    m = run_engine(moe, tmp, f"moe-{family}", **common)
    rows.append(compare(family, "dense vLLM", 0.0, d["batch"], m, len(PROMPTS)))
    # tau > 0: the Triton kernels serve (fused router, decode and grouped paths) under CUDA graphs;
    # checked against the masked torch reference (fp32, on the CPU).
    k = run_engine(moe, tmp, f"moe-{family}-tau", **common, hf_overrides={"d2dmoe_tau": TAU})
    ref = reference_model(dense, moe, TAU)
    want = [dict(zip(("tokens", "logprobs"), greedy(ref, o["prompt_ids"], len(o["tokens"])))) for o in k["batch"]]
    rows.append(compare(family, "torch reference", TAU, want, k, len(PROMPTS)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer-dir", type=Path, help="dir with GPT-2 vocab.json + merges.txt")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--families", default="gpt2,gemma3_text")
    ap.add_argument("--attention", action="store_true", help="also attention-projection experts")
    ap.add_argument("--attention-only", action="store_true", help="only the attention-projection checkpoints")
    ap.add_argument("--attention-taus", default="0,0.5")
    args = ap.parse_args()

    import vllm

    from d2dmoe_converter.attention import AttentionOptions
    from d2dmoe_converter.convert import ConvertOptions, convert
    from d2dmoe_converter.calibrate import CalibrateOptions
    from d2dmoe_converter.routers import RouterOptions
    from reference_model import greedy, reference_model
    from tiny_models import make_dense

    common = dict(dtype="float32", enforce_eager=False, gpu_memory_utilization=0.3, max_model_len=256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        text = tmp / "repo-text.txt"   # training text for routers / distillation: the repository's sources
        text.write_text("\n\n".join(f.read_text() for f in sorted(ROOT.rglob("*.py")) + sorted(ROOT.rglob("*.md"))
                                    if ".venv" not in f.parts and ".devcarry" not in f.parts))
        small = dict(corpus=str(text), routers=RouterOptions(tokens=4096, steps=200),
                     calibrate=CalibrateOptions(tokens=512, eval_tokens=512))
        for family in args.families.split(","):
            dense = make_dense(family, tmp / f"dense-{family}", hidden=256, layers=4, tokenizer_source=args.tokenizer_dir)
            moe = tmp / f"moe-{family}"
            if not args.attention_only:
                plain_checks(family, dense, moe, tmp, small, common, rows)
            if args.attention or args.attention_only:  # every attention projection as experts too
                attn = tmp / f"moe-attn-{family}"
                convert(dense, attn, ConvertOptions(expert_size=32, **small, attention=AttentionOptions(
                    projections=("all",), tokens=4096, steps=200)))
                for tau in (float(t) for t in args.attention_taus.split(",")):
                    a = run_engine(attn, tmp, f"attn-{family}-{tau}", **common, hf_overrides={"d2dmoe_tau": tau})
                    ref = reference_model(dense, attn, tau)
                    want = [dict(zip(("tokens", "logprobs"), greedy(ref, o["prompt_ids"], len(o["tokens"]))))
                            for o in a["batch"]]
                    rows.append({**compare(family + "+attn", "torch reference", tau, want, a, len(PROMPTS)),
                                 "projection_fraction": a["report"].get("projection_fraction")})
                    print(rows[-1], flush=True)
    print(f"{'family':12s} {'tau':>4s} {'against':16s} {'identical':>10s} {'max |dlogp|':>12s} {'executed':>9s}")
    for r in rows:
        print(f"{r['family']:12s} {r['tau']:4.1f} {r['against']:16s} {r['identical_greedy_outputs']:>4d}/{r['prompts']:<5d} "
              f"{r['max_logprob_diff']:12.2e} {r['executed_fraction']:9.2f}")
    result = {**provenance(vllm=vllm.__version__), "settings": {**common, "cuda_graphs": True}, "rows": rows}
    device = result["device"]
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu-check-plugin-" + device.replace(" ", "-").lower() + ".json"
    (args.out / name).write_text(json.dumps(result, indent=1))
    ok = all(r["identical_greedy_outputs"] == r["prompts"] for r in rows)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
