"""Kernel configs side by side: the D2DMoE layer under the device's config and named overrides of it.

    python benchmarks/compare_configs.py --out DIR --name 35-reduce-e128 \
        --case gemma-2b-ffn:128,256 --tokens 1,2,3 --fractions 0.1,0.3,1.0 \
        --variant 'S128={"fused@d2048e128": {"REDUCE_BLOCK_S": 128}}'

An attempt at a launch config is a prediction about one key; this times it in the kernels benchmark's
setting (CUDA graphs of back-to-back calls, weights rotated beyond L2, router paid, routing
controlled) against the dense MLP and the unchanged device config, which runs first and last so the
spread between its two runs is on the table too. An override is merged into the device config key by
key (``{"router": {...}}`` changes only the router keys it names; ``"fused@d2048": {...}`` likewise).
Writes ``<name>.json`` and prints one line per (shape, expert size, T, fraction); a variant that fails to
compile or launch (e.g. out of shared memory) gets its error in its row and the rest go on.
"""

import argparse
import json
from pathlib import Path

import torch
import triton

from bench_kernels import SHAPES, copies_for, dense_forward, graphed, make_dense, make_moe, moe_us, reps_for, \
    routing_scores, time_us
from d2dmoe_kernels.configs import kernel_config, with_overrides
from provenance import provenance


def parse_variant(text: str) -> tuple[str, dict]:
    label, _, overrides = text.partition("=")
    try:
        parsed = json.loads(overrides)
    except json.JSONDecodeError as exc:
        raise SystemExit(f"--variant {text!r}: expected LABEL=JSON (a dict of path -> keys): {exc}") from None
    if not label or not isinstance(parsed, dict) or not all(isinstance(v, dict) for v in parsed.values()):
        raise SystemExit(f"--variant {text!r}: expected LABEL={{\"path\": {{\"KEY\": value}}}}")
    return label, parsed


def parse_case(text: str) -> tuple[str, tuple[int, ...]]:
    shape, _, sizes = text.partition(":")
    if shape not in SHAPES:
        raise SystemExit(f"--case {text!r}: unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return shape, tuple(int(s) for s in sizes.split(",")) if sizes else SHAPES[shape][5]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--name", required=True, help="the JSON's file name, without .json")
    ap.add_argument("--case", action="append", type=parse_case, required=True, help="SHAPE[:expert sizes]")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--fractions", default="0.3")
    ap.add_argument("--routing", default="independent", choices=("independent", "shared"))
    ap.add_argument("--variant", action="append", type=parse_variant, default=[], help="LABEL=JSON overrides")
    args = ap.parse_args()

    device_cfg = kernel_config(torch.cuda.get_device_name())
    variants = [("device", device_cfg), *((label, with_overrides(device_cfg, o)) for label, o in args.variant),
                ("device again", device_cfg)]
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name}.json"
    for shape, sizes in args.case:
        d, dff, gated, act, width, _ = SHAPES[shape]
        n = copies_for(3 * d * dff * 2)
        dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
        for es in sizes:
            moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
            counters = torch.zeros(3, dtype=torch.int64, device="cuda")
            for T in (int(t) for t in args.tokens.split(",")):
                reps = reps_for(T)
                x = torch.randn(T, d, device="cuda", dtype=dtype)
                dense = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], reps))
                for frac in (float(f) for f in args.fractions.split(",")):
                    routing, real = routing_scores(T, dff // es, frac, args.routing, dtype)
                    line = f"{shape:16s} e={es:3d} T={T:4d} f={real:.2f} dense {dense:7.2f}"
                    for label, cfg in variants:
                        row = dict(shape=shape, expert_size=es, tokens=T, fraction=round(real, 4),
                                   routing=args.routing, config=label, dense_us=round(dense, 2))
                        try:
                            us = moe_us(x, routing, moe_ws, 0.99, act, counters, reps, cfg)
                        except Exception as exc:  # a variant that does not compile or launch loses its row only
                            rows.append({**row, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
                            line += f" | {label} {type(exc).__name__}"
                            continue
                        rows.append({**row, "us": round(us, 2), "speedup": round(dense / us, 3)})
                        line += f" | {label} {us:7.2f}"
                    print(line, flush=True)
                path.write_text(json.dumps({**provenance(triton=triton.__version__), "dtype": "bfloat16",
                                            "variants": {label: o for label, o in args.variant}, "rows": rows},
                                           indent=1))  # after each T: a cut-off run keeps its rows
            del moe_ws
            torch.cuda.empty_cache()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
