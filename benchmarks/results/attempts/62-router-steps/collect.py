"""Collects the converter reports in this folder's logs into ../../router-steps-gemma3-270m-cpu.json.

    cd benchmarks && python results/attempts/62-router-steps/collect.py

The runs themselves are the d2dmoe-convert commands in README.md, beside this file. They were made on 2 CPU cores
on 2026-12-08, at af078c0 (rel.log also had router-loss-relative.diff applied). The main job ran at af078c0 with the
2000-step default in the working tree, before it was committed as 1952ff9.
"""

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))   # benchmarks/: provenance
from provenance import provenance  # noqa: E402

BASE = "d2dmoe-convert /tmp/s61/gemma3-270m-q4_k_m.gguf /tmp/s62/rel --work-dir /tmp/s62/rel.work --budget 0.5 --dtype bfloat16"
RUNS = {  # log: (reference, router steps, width, tokens, loss, extra args)
    "rel": ("sum", 500, 128, 16384, "relative", "--reference sum --router-loss relative"),
    "steps2000": ("sum", 2000, 128, 16384, "mse", "--reference sum --router-steps 2000"),
    "sum4000": ("sum", 4000, 128, 16384, "mse", "--reference sum --router-steps 4000"),
    "w256": ("sum", 2000, 256, 16384, "mse", "--reference sum --router-steps 2000 --router-width 256"),
    "tok65k": ("sum", 2000, 128, 65536, "mse", "--reference sum --router-steps 2000 --router-tokens 65536"),
    "max2000": ("max", 2000, 128, 16384, "mse", "--router-steps 2000"),
    "main-job": ("max", 2000, 128, 16384, "mse", None),
}


def report(text: str) -> dict:
    num = lambda pattern: float(re.search(pattern, text).group(1))  # noqa: E731
    return {"ffn_compute": num(r"executed FFN compute\s+([\d.]+)%") / 100,
            "ppl_dense": num(r"dense ([\d.]+) -> converted"), "ppl": num(r"-> converted ([\d.]+)"),
            "budget": num(r"budget (\d+)% of FFN") / 100, "routers_s": num(r"routers ([\d.]+),")}


def main():
    rows = []
    for log, (reference, steps, width, tokens, loss, args) in RUNS.items():
        rows.append({"log": f"{log}.log", "reference": reference, "router_steps": steps, "router_width": width,
                     "router_tokens": tokens, "router_loss": loss,
                     "command": f"{BASE} {args}" if args else ".venv/bin/d2dmoe-demo --work-dir /tmp/s62/demo",
                     "git_sha": "af078c0+2000-step default (committed as 1952ff9)" if args is None else "af078c0" + ("+router-loss-relative.diff" if loss != "mse" else ""),
                     **report((HERE / f"{log}.log").read_text())})
    doc = {**provenance(), "runs_date": "2026-12-08", "runs_device": "cpu (2 cores)",
           "model": "Gemma 3 270M (Q4_K_M GGUF, dequantised), 32 x 64-neuron experts, co-activation split, GELU-tanh kept",
           "heldout_tokens": 4096, "note": "the converter's reports, parsed from the logs beside collect.py; "
           "session 61's 500-step runs on the same stages: sum 51.31 at 48.6%, max 59.06 at 48.7%", "rows": rows}
    out = HERE.parents[1] / "router-steps-gemma3-270m-cpu.json"
    out.write_text(json.dumps(doc, indent=1))
    for r in rows:
        print(f"{r['log']:15s} {r['reference']:4s} steps {r['router_steps']:5d} w {r['router_width']:3d} "
              f"tokens {r['router_tokens']:6d} {r['router_loss']:8s} ppl {r['ppl']:6.2f} at {r['ffn_compute']:.1%}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
