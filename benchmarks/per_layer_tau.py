"""One tau against a tau per FFN layer (``d2dmoe-convert --tau-per-layer``) on the embedded Gemma 3 270M,
CPU defaults (no sparsity fine-tuning), at the same FFN compute budget.

    python benchmarks/per_layer_tau.py [--work DIR] [--budget 0.5] [--expert-size 64] [--sensitivity-tokens 512]

Both conversions share one work dir (the per-layer one reuses every stage up to calibration), so a
rerun resumes. Writes ``benchmarks/results/per-layer-tau-gemma3-270m-cpu-default.json`` (both reports,
the per-layer calibration: sensitivity curves, candidates, chosen taus; provenance) and a PNG beside it
(per-layer taus and executed fractions). About 40 min on 2 CPU cores from scratch (dequantise, routers,
two calibrations), mostly the sensitivity passes.
"""

import argparse
import json
from pathlib import Path

from provenance import ROOT, provenance

OUT = ROOT / "benchmarks" / "results" / "per-layer-tau-gemma3-270m-cpu-default.json"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    one, per = doc["one_tau"], doc["per_layer"]
    layers = range(len(one["layer_fraction"]))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    ax1.plot(layers, [one["tau"]] * len(layers), "o-", label=f"one tau ({one['tau']:.3f})")
    if per["layer_tau"]:
        ax1.plot(layers, per["layer_tau"], "s-", label="a tau per layer")
    ax1.set_ylabel("tau")
    ax1.legend()
    for name, r in (("one tau", one), ("a tau per layer", per)):
        ax2.plot(layers, r["layer_fraction"], "o-" if name == "one tau" else "s-",
                 label=f"{name}: {r['ffn_fraction']:.1%} of FFN compute, held-out ppl {r['ppl_converted']:.2f}")
    ax2.set_ylabel("executed fraction of experts (held-out)")
    ax2.set_xlabel("layer")
    ax2.set_ylim(0, 1.02)
    ax2.legend(fontsize=8)
    fig.suptitle(f"Gemma 3 270M, CPU defaults, budget {doc['budget']:.0%} of FFN compute "
                 f"(dense ppl {one['ppl_dense']:.2f})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "d2dmoe-vllm" / "per-layer-tau")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--expert-size", type=int, default=64)
    ap.add_argument("--sensitivity-tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    from d2dmoe_converter.calibrate import CalibrateOptions
    from d2dmoe_converter.convert import ConvertOptions, convert, format_report
    from d2dmoe_converter.routers import RouterOptions
    from d2dmoe_vllm.demo import default_model_gguf

    gguf = default_model_gguf(args.work)
    doc = {**provenance(), "model": "Gemma 3 270M (Q4_K_M GGUF, dequantised)", "budget": args.budget,
           "expert_size": args.expert_size, "sensitivity_tokens": args.sensitivity_tokens}
    for key, per_layer in (("one_tau", False), ("per_layer", True)):
        opts = ConvertOptions(expert_size=args.expert_size, split="kmeans", dtype="bfloat16", overwrite=True,  # as measured
                              work_dir=str(args.work / "stages"), routers=RouterOptions(steps=500),
                              calibrate=CalibrateOptions(budget=args.budget, per_layer=per_layer,
                                                         sensitivity_tokens=args.sensitivity_tokens))
        report = convert(gguf, args.work / key, opts)
        print(format_report(report))
        stage = "calibrate-per-layer" if per_layer else "calibrate"
        calib = json.loads((args.work / "stages" / stage / "result.json").read_text())
        doc[key] = {**{k: report.get(k) for k in ("tau", "layer_tau", "ffn_fraction", "ppl_dense", "ppl_converted",
                                                   "heldout_tokens", "seconds")},
                    "layer_fraction": calib["layer_fraction"], "calibration": calib.get("per_layer")}
    doc["ppl_change"] = doc["per_layer"]["ppl_converted"] / doc["one_tau"]["ppl_converted"] - 1
    args.out.write_text(json.dumps(doc, indent=1))
    plot(doc, args.out.with_suffix(".png"))
    print(f"one tau: {doc['one_tau']['ffn_fraction']:.1%} of FFN compute, held-out ppl {doc['one_tau']['ppl_converted']:.2f}; "
          f"a tau per layer: {doc['per_layer']['ffn_fraction']:.1%}, {doc['per_layer']['ppl_converted']:.2f} "
          f"({doc['ppl_change']:+.1%}); wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
