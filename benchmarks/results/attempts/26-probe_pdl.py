"""Attempt 26 probe (H200): programmatic dependent launch (PDL) for the small-T paths.

Hypothesis: at T = 1 the layer is a chain of 3-4 short kernels (router GEMM, router tail, fused
decode, reduction; GPT-2 and Gemma 3 270M: router GEMM, fused decode with the tail inside,
reduction; T >= 5 on the small shapes: router GEMM, masked up kernel, down GEMM), and each boundary
costs a launch gap plus the ramp of the next grid (~2 us inside a CUDA graph). Launched as
programmatic dependents (``"pdl": true``: ``launch_pdl`` + ``gdc_wait`` first in the kernel), the
next grid is resident before the previous one ends. Predicted: -1 to -2 us per Triton boundary, so
Gemma-2B e=256 T=1 30%: 34 -> ~30 us, GPT-2 T=1: 14.5 -> ~12.5 us.

Same timing as bench_kernels.py (CUDA graphs of back-to-back layer calls, weights rotated beyond L2,
router paid, controlled routing); every row times the device config with and without PDL.

    python benchmarks/results/attempts/26-probe_pdl.py OUT_DIR
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
PDL = {k: {**v, "pdl": True} if k.split("@")[0] in ("router", "fused", "masked") else v for k, v in DEV.items()}
PLAN = (  # shape, expert sizes, tokens, fractions
    ("gemma-2b-ffn", (256, 512), (1, 3, 16, 64), (0.1, 0.3, 0.5)),
    ("gpt2-ffn", (64, 128), (1, 4, 16, 64, 256), (0.3,)),
    ("gemma3-270m-ffn", (64, 128), (1, 4, 16, 64, 256), (0.3,)),
)


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "26-probe-pdl.json").write_text(json.dumps(
            {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))

    for shape, sizes, tokens, fractions in PLAN:
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
                    us = {}
                    for label, cfg in (("off", DEV), ("pdl", PDL), ("off again", DEV)):
                        us[label] = moe_us(x, routing, moe_ws, 0.99, act, counters, reps, cfg)
                    rows.append(dict(shape=shape, expert_size=es, tokens=T, fraction=real, dense_us=round(dense, 2),
                                     off_us=round(us["off"], 2), pdl_us=round(us["pdl"], 2),
                                     off_again_us=round(us["off again"], 2),
                                     speedup_off=round(dense / us["off"], 3), speedup_pdl=round(dense / us["pdl"], 3)))
                    print(f"{shape:16s} e={es:3d} T={T:4d} f={real:.2f} dense {dense:7.2f}  off {us['off']:7.2f} "
                          f"({dense / us['off']:4.2f}x)  pdl {us['pdl']:7.2f} ({dense / us['pdl']:4.2f}x)  "
                          f"off again {us['off again']:7.2f}", flush=True)
                save()
            del moe_ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
