"""Attempt 30 probe (H200): the fused decode kernel's reduction in its last program (``reduce_in_kernel``).

Hypothesis: at T <= 4 the small shapes (GPT-2, Gemma 3 270M) run router first layer + fused kernel (router
tail inside) + reduction: three short launches, latency-bound (GPT-2 T=1: 12.0 us against dense 14.3, 1.19x;
1.3x needs ~11 us). The reduction launch waits for the whole fused grid, then reads a few tens of KB. Done by
the last fused program to take a ticket (selected slots compacted first, so it loads only those), it saves
that launch's wait and ramp. Predicted: -1 us at T = 1 for GPT-2 / Gemma 3 270M, less at T = 4 (the last
program reduces T tokens alone); a loss at Gemma-2B (2048 columns x ~77 slices for one program).
Times the device config, the in-kernel reduction with two tile shapes, and the device config again.

    python benchmarks/results/attempts/30-probe_reduce_in_kernel.py OUT_DIR

Ran at fe1dee3, the commit that had ``reduce_in_kernel`` (refuted: 1.4-8x slower in every row, one program's
bandwidth; reverted after it, so this script needs that commit to run).
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


def reduce_in_kernel(block_s, block_n):
    return {**DEV, **{k: {**v, "reduce_in_kernel": True, "REDUCE_BLOCK_S": block_s, "REDUCE_BLOCK_N": block_n}
                      for k, v in DEV.items() if k.startswith("fused")}}


VARIANTS = {"device": DEV, "reduce 32x256": reduce_in_kernel(32, 256), "reduce 16x128": reduce_in_kernel(16, 128),
            "device again": DEV}
PLAN = (("gpt2-ffn", (32, 64, 128), (1, 2, 3, 4)),
        ("gemma3-270m-ffn", (32, 64, 128), (1, 2, 3, 4)),
        ("gemma-2b-ffn", (256,), (1, 2, 3)))
ROUTINGS = ((0.1, "independent"), (0.3, "independent"), (0.5, "independent"), (0.3, "shared"))


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for shape, sizes, tokens in PLAN:
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
                for frac, how in ROUTINGS:
                    routing, real = routing_scores(T, E, frac, how, dtype)
                    line = f"{shape:16s} e={es:3d} T={T} {how[:5]} f={real:.2f} dense {dense:6.2f}"
                    for label, cfg in VARIANTS.items():
                        us = moe_us(x, routing, moe_ws, 0.99, act, counters, reps, cfg)
                        rows.append(dict(shape=shape, expert_size=es, tokens=T, fraction=real, routing=how,
                                         config=label, dense_us=round(dense, 2), us=round(us, 2),
                                         speedup=round(dense / us, 3)))
                        line += f" | {label} {us:6.2f}"
                    print(line, flush=True)
                (out / "30-probe-reduce-in-kernel.json").write_text(json.dumps(
                    {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))
            del moe_ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
