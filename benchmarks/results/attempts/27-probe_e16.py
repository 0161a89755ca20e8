"""Attempt 27 probe (H200): launch configs for 16-neuron experts at the Gemma 3 270M FFN shape.

The GPU recipe's 16-neuron conversion (128 experts per layer) keeps ~11% lower perplexity than 64-neuron
experts at 50% of FFN compute, but with the device file's d640 keys its layer ran 0.65-0.90x of dense at
T = 4-256 and 0.32-0.35x at T >= 1024: the masked path's router-in-kernel mode tiles one expert wide
(16 neurons). Hypothesis: with the router outside the kernel (given scores) the masked tiles span
experts (as for 32-neuron experts, attempt 19) and the cuBLAS-GEMM masked path (attempt 24) covers large
T, so e=16 comes back near e=32's numbers (0.8-1.0x). Rows: device config vs variants, 30% and 100%.

    python benchmarks/results/attempts/27-probe_e16.py OUT_DIR
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
SPAN = [[1 << 30, {"own_router": False, "BLOCK_T": 64, "BLOCK_J": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}]]
SPAN_BIG = [[256, SPAN[0][1]], [1 << 30, {"own_router": False, "BLOCK_T": 128, "BLOCK_J": 64, "BLOCK_K": 64,
                                          "num_warps": 8, "num_stages": 3}]]
VARIANTS = {
    "device": DEV,
    "span": {**DEV, "masked@d640e16": {"by_tokens": SPAN}},
    "span+big": {**DEV, "masked@d640e16": {"by_tokens": SPAN_BIG}},
    "span+big+gemm256": {**DEV, "masked@d640e16": {"by_tokens": SPAN_BIG},
                         "gemm@d640e16": {"min_tokens": 256, "max_tokens": 1 << 30, "BLOCK_T": 64, "BLOCK_C": 128,
                                          "num_warps": 4}},
}


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    d, dff, gated, act, width, _ = SHAPES["gemma3-270m-ffn"]
    n = copies_for(3 * d * dff * 2)
    dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
    for es in (16, 32):
        moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
        E = dff // es
        counters = torch.zeros(3, dtype=torch.int64, device="cuda")
        for T in (16, 64, 256, 1024, 4096, 16384):
            reps = reps_for(T)
            x = torch.randn(T, d, device="cuda", dtype=dtype)
            dense = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], reps))
            for frac in (0.3, 1.0):
                routing, real = routing_scores(T, E, frac, "independent", dtype)
                line = f"e={es:3d} T={T:6d} f={real:.2f} dense {dense:8.2f}"
                for label, cfg in VARIANTS.items():
                    if es == 32 and label != "device":
                        continue
                    us = moe_us(x, routing, moe_ws, 0.99, act, counters, reps, cfg)
                    rows.append(dict(expert_size=es, tokens=T, fraction=real, config=label, dense_us=round(dense, 2),
                                     us=round(us, 2), speedup=round(dense / us, 3)))
                    line += f"  {label} {us:8.2f} ({dense / us:4.2f}x)"
                print(line, flush=True)
                (out / "27-probe-e16.json").write_text(json.dumps(
                    {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
