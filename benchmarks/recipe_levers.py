"""One table and one plot from several GPU-recipe runs: what each lever bought at the calibrated budget.

    python benchmarks/recipe_levers.py --out benchmarks/results/levers-gemma3-270m.json \\
        "480 steps, kmeans=benchmarks/results/attempts/42-levers-h100/recipe-480-kmeans.json" ...

Each LABEL=PATH is a ``gpu_convert_recipe.py`` JSON (``convert-recipe-gemma3-270m.json``, with or without
``--no-sweep``). A row per conversion it holds: the split, sparsify steps and teacher-text share it was made
with, executed FFN compute and held-out perplexity at the calibrated tau (the converter's report: SOTU
2016-2021, the calibration's eval tokens), the sparsified model's perplexity on the same tokens, and the
original's. Writes the JSON (rows + each run's provenance) and a bar chart beside it (``.png``): per run, the
sparsified model and each conversion, against the original and the issue's +5% target.
"""

import argparse
import json
import textwrap
from pathlib import Path

from provenance import provenance

TARGET = 1.05   # issue 5: within +5% of the original's held-out perplexity at 50% of FFN compute


def rows_of(label: str, run: dict) -> list[dict]:
    recipe, sparsify = run["recipe"], run.get("sparsify", {})
    common = {"run": label, "split": recipe.get("split", "kmeans"), "expert_size": recipe["expert_size"],
              "sparsify_steps": recipe["sparsify"]["steps"], "generated": recipe["sparsify"].get("generated", 0.0),
              "activation": recipe["sparsify"].get("activation", "relu"), "hoyer_alpha": recipe["sparsify"]["alpha"],
              "adapt_steps": recipe.get("adapt", {}).get("steps", 0), "adapt_lr": recipe.get("adapt", {}).get("lr"),
              "final_hoyer": sparsify.get("final_hoyer"), "final_zero_fraction": sparsify.get("final_zero_fraction"),
              "final_task_loss": sparsify.get("final_task_loss"), "device": run["provenance"]["device"],
              "date": run["provenance"]["date"]}
    out = []
    for key, report in run.items():
        if not key.startswith("report_"):
            continue
        # after an adapt stage the report's dense model is the adapted one: the sparsified model is its "before"
        sparsified = report["adapt"]["before"]["ppl_dense"] if "adapt" in report else report["ppl_dense"]
        out.append({**common, "method": key.removeprefix("report_"), "tau": report["tau_summary"],
                    "ffn_compute": report["ffn_fraction"], "ppl": report["ppl_converted"],
                    "ppl_sparsified": sparsified, "ppl_original": report["ppl_original"],
                    "vs_original": report["ppl_converted"] / report["ppl_original"] - 1,
                    "vs_sparsified": report["ppl_converted"] / sparsified - 1,
                    "heldout_tokens": report["heldout_tokens"]})
    if not out:
        raise SystemExit(f"[levers] {label}: no finished conversion (report_*) in that JSON. "
                         f"Fix: pass a gpu_convert_recipe.py JSON from a run that finished its conversions")
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Horizontal bars, a group per run (top to bottom in the order given), so the chart grows down, not sideways."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(dict.fromkeys(r["run"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    bars = ["sparsified (100%)"] + methods
    height = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(runs) * len(bars) / 2 + 2.2))
    for b, name in enumerate(bars):
        for i, run in enumerate(runs):
            mine = [r for r in rows if r["run"] == run]
            if b == 0:
                value, text = mine[0]["ppl_sparsified"], ""
            else:
                hit = [r for r in mine if r["method"] == name]
                if not hit:
                    continue
                value, text = hit[0]["ppl"], f" at {hit[0]['ffn_compute']:.1%}"
            y = i + (b - (len(bars) - 1) / 2) * height
            ax.barh(y, value, height, color=f"C{b}", label=name if name not in ax.get_legend_handles_labels()[1] else None)
            ax.text(value, y, f" {value:.2f}{text}", va="center", ha="left", fontsize=7)
    original = rows[0]["ppl_original"]
    ax.axvline(original, color="k", lw=1, label=f"original {original:.2f}")
    ax.axvline(original * TARGET, color="k", ls="--", lw=1, label=f"target +5% ({original * TARGET:.2f})")
    ax.set_yticks(range(len(runs)), [textwrap.fill(run, 40, break_on_hyphens=False) for run in runs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("held-out perplexity (SOTU 2016-2021)")
    ax.set_xlim(0, max(r["ppl"] for r in rows) * 1.22)
    ax.set_title("Gemma 3 270M, GPU recipe: perplexity at the calibrated 50% FFN budget, by lever", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", metavar="LABEL=PATH")
    ap.add_argument("--out", type=Path, required=True, help="the JSON to write (the plot goes beside it, .png)")
    args = ap.parse_args()
    rows, sources = [], {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            raise SystemExit(f"[levers] {item!r}: expected LABEL=PATH of an existing recipe JSON")
        run = json.loads(Path(path).read_text())
        rows += rows_of(label, run)
        sources[label] = {"file": path, "provenance": run["provenance"]}
    doc = {**provenance(), "target": f"ppl within +{TARGET - 1:.0%} of the original at 50% of FFN compute",
           "runs": sources, "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    plot(rows, args.out.with_suffix(".png"))
    print(f"{'run':34} {'method':17} {'FFN':>6} {'ppl':>7} {'vs orig':>8} {'sparsified':>10} {'vs sp.':>7} "
          f"{'zeros':>6}  device")
    for r in rows:
        zeros = "" if r["final_zero_fraction"] is None else f"{r['final_zero_fraction']:.1%}"
        print(f"{r['run']:34} {r['method']:17} {r['ffn_compute']:6.1%} {r['ppl']:7.2f} {r['vs_original']:+8.1%} "
              f"{r['ppl_sparsified']:10.2f} {r['vs_sparsified']:+7.1%} {zeros:>6}  "
              f"{r['device'].removeprefix('NVIDIA ')}")
    print(f"[levers] wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
