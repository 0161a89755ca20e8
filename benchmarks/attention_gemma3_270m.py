"""Attention-projection experts on the real Gemma 3 270M: what they save and what they cost, against
FFN-only D2DMoE at the same whole-model compute (CPU).

    python benchmarks/attention_gemma3_270m.py --work /tmp/d2e [--minutes 30]

1. Converts the GGUF with the CPU defaults of ``quality_gemma3_270m.py`` (same work directory, so the
   dense, split and router stages are shared), once FFN-only and once with ``--attention-experts all``
   (q/k/v/o each a distilled equal-cost ReLU MLP of 16-neuron experts; distillation and routers on
   8192 SOTU tokens per projection).
2. Sweeps tau over both with ``evaluate`` (perplexity on SOTU 2016-2021 and BBC News held-out text,
   BoolQ; small budgets stated in the JSON) and writes ``benchmarks/results/attention-gemma3-270m.json``
   + plots: quality against whole-model compute, one curve per method.
"""

import argparse
import json
import time
from pathlib import Path

from provenance import ROOT, provenance
from quality_gemma3_270m import CONVERT, convert_checkpoints

ATTENTION = ["--attention-experts", "all", "--attn-expert-size", "16", "--attn-tokens", "8192", "--attn-steps", "400"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/d2e"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "attention-gemma3-270m.json")
    ap.add_argument("--minutes", type=float, default=30.0, help="start no new sweep point after this long")
    ap.add_argument("--taus", default="0,0.06,0.11,0.15")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--items", type=int, default=100)
    args = ap.parse_args()
    deadline = time.time() + args.minutes * 60
    work = args.work
    reports = convert_checkpoints(work, {"ckpt-d2dmoe": [], "ckpt-d2dmoe-attention": ATTENTION})

    from d2dmoe_converter.evaluate import EvalOptions, evaluate, format_table

    taus = tuple(float(x) for x in args.taus.split(","))
    opts = EvalOptions(taus=taus, corpora=("sotu", "bbc"), tasks=("boolq",), tokens=args.tokens, items=args.items,
                       seq_len=256, batch=2, device="cpu", tags=(("conversion", "cpu-default"),))
    result = evaluate(work / "stages" / "dense", [work / "ckpt-d2dmoe", work / "ckpt-d2dmoe-attention"], opts,
                      out=args.out, resume=True, deadline=deadline,
                      title="Gemma 3 270M: FFN-only D2DMoE vs + attention-projection experts")
    result["provenance"] = provenance()
    result["conversion"] = {"command": "d2dmoe-convert GGUF OUT " + " ".join(CONVERT) + " [" + " ".join(ATTENTION) + "]",
                            "reports": reports}
    args.out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {args.out} (+ plots); complete: {result['complete']}; {result['seconds']} s")


if __name__ == "__main__":
    main()
