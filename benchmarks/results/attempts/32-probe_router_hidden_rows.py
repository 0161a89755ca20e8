"""Attempt 32 probe (H200): token rows per program of the Triton router first layer (``HIDDEN_BLOCK_T``).

Nsight Compute (attempt 31, ``31-ncu.csv``) puts GPT-2 e=64 T=64's router first layer at 4.9 us on its own,
against 2.6 us for the dense MLP's elementwise activation and 8.1 / 6.0 us for the masked up kernel with /
without the router's tail: with 64 token rows per program it runs router width / 16 = 8 programs, each a
chain of K steps. Predicted: 16 or 32 rows per program (4x / 2x the programs, W1 re-read from L2) take
~1 us off the layer at T = 32-128, nothing at T = 16 (one token block already). Times the device config
(64 rows), 32 and 16 rows, 16 rows with 32-unit blocks, and the device config again, in graphs of 32 calls.

    python benchmarks/results/attempts/32-probe_router_hidden_rows.py OUT_DIR
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


def with_rows(block_t, block_w=16):
    return {**DEV, "router": {**DEV["router"], "HIDDEN_BLOCK_T": block_t, "HIDDEN_BLOCK_W": block_w}}


VARIANTS = {"device": DEV, "rows 32": with_rows(32), "rows 16": with_rows(16), "rows 16 w32": with_rows(16, 32), "device again": DEV}
PLAN = (("gpt2-ffn", (32, 64, 128), (0.3,)),
        ("gemma3-270m-ffn", (32, 64, 128), (0.3,)),
        ("gemma-2b-ffn", (256,), (0.3,)))


def main(out, tokens):
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
                    for label, cfg in VARIANTS.items():
                        us = moe_us(x, routing, moe_ws, 0.99, act, counters, reps, cfg)
                        rows.append(dict(shape=shape, expert_size=es, tokens=T, fraction=real, config=label,
                                         dense_us=round(dense, 2), us=round(us, 2), speedup=round(dense / us, 3)))
                        line += f" | {label} {us:6.2f}"
                    print(line, flush=True)
                (out / "32-probe-router-hidden-rows.json").write_text(json.dumps(
                    {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))
            del moe_ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokens", default="16,32,64,128")
    args = ap.parse_args()
    main(args.out, [int(t) for t in args.tokens.split(",")])
