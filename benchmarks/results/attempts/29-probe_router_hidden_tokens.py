"""Attempt 29 probe (H200): the Triton router first layer (attempt 28) past 16 tokens.

Hypothesis: at 17-64 tokens the masked path (GPT-2, Gemma 3 270M: 0.78-0.88x dense at 30%) still pays the
cuBLAS router GEMM's launch and cannot start its dependents early; attempt 28 measured the Triton first
layer only up to 16 tokens (GPT-2 T=16: 18.4 -> 17.1 us). Predicted: -1 us at T=32, less at T=64, where
the Triton launch has few programs (router width / 16) for more tokens. Times the device config
(hidden_max_tokens 16 when this ran, at 12eaf97; 64 since, from these numbers), the same with the Triton
first layer up to --max tokens, and the device config again.

    python benchmarks/results/attempts/29-probe_router_hidden_tokens.py OUT_DIR                      # T 32, 64
    python benchmarks/results/attempts/29-probe_router_hidden_tokens.py OUT_DIR --tokens 128,256 --max 256
"""

import json
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_kernels import (SHAPES, copies_for, dense_forward, graphed, make_dense, make_moe,  # noqa: E402
                           moe_us, reps_for, routing_scores, time_us)
from provenance import provenance  # noqa: E402

from d2dmoe_kernels.configs import kernel_config  # noqa: E402

DEV = kernel_config(torch.cuda.get_device_name())


def variants(top):
    return {"device": DEV, f"hidden to {top}": {**DEV, "router": {**DEV["router"], "hidden_max_tokens": top}},
            "device again": DEV}
PLAN = (("gpt2-ffn", (64, 128), (0.3,)),
        ("gemma3-270m-ffn", (64, 128), (0.3,)),
        ("gemma-2b-ffn", (256,), (0.3,)))


def main(out, tokens, top):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for shape, sizes, fractions in PLAN:
        d, dff, gated, act, width, _ = SHAPES[shape]
        n = copies_for(3 * d * dff * 2)
        dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
        for es in sizes:
            moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
            E = dff // es
            counters = torch.zeros(3, dtype=torch.int64, device="cuda")
            for T in tokens:
                reps = reps_for(T)
                x = torch.randn(T, d, device="cuda", dtype=dtype)
                dense = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], reps))
                for frac in fractions:
                    routing, real = routing_scores(T, E, frac, "independent", dtype)
                    line = f"{shape:16s} e={es:3d} T={T:3d} f={real:.2f} dense {dense:6.2f}"
                    for label, cfg in variants(top).items():
                        us = moe_us(x, routing, moe_ws, 0.99, act, counters, reps, cfg)
                        rows.append(dict(shape=shape, expert_size=es, tokens=T, fraction=real, config=label,
                                         dense_us=round(dense, 2), us=round(us, 2), speedup=round(dense / us, 3)))
                        line += f" | {label} {us:6.2f}"
                    print(line, flush=True)
                (out / f"29-probe-router-hidden-{top}.json").write_text(json.dumps(
                    {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))
            del moe_ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", default="32,64")
    ap.add_argument("--max", type=int, default=64, help="hidden_max_tokens of the Triton variant")
    args = ap.parse_args()
    main(args.out, [int(t) for t in args.tokens.split(",")], args.max)
