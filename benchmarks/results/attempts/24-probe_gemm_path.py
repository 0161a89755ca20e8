"""Attempt 24 probe (H200): the cuBLAS-GEMM masked path (``expert_masked_gemm.py``: up GEMM over the
stacked [w_in; w_up; router_in], one Triton select + act launch, down GEMM) against the device's
current dispatch and the dense MLP, every shape and expert size of bench_kernels.py, T 1..16384, 10 /
30 / 50 / 100% independent routing and 30% shared (rounds 1-2: the router's tail inside the select kernel,
recomputed by every program; round 3: the router tail as its own launch, the select kernel
elementwise; 30% / 30% shared / 100%, T >= 4). Hypothesis: where independent selections cover
nearly every expert (T >= 16 at 30%) and Triton's tiles lose to cuBLAS (GPT-2, Gemma 3 270M, small
experts, large T), the gemm path costs the dense MLP plus the router's columns: ~0.95-1.0x dense,
against 0.3-0.9x now; with 256/512-neuron Gemma-2B experts at large T grouped stays ahead. Same
timing as bench_kernels.py (CUDA graphs of back-to-back calls, weights rotated beyond L2, router
paid, controlled routing). Writes 24-probe-gemm-path.json with provenance after every shape.

    python benchmarks/results/attempts/24-probe_gemm_path.py OUT_DIR [shape,...]
"""

import json
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_kernels import (SHAPES, copies_for, dense_forward, graphed, make_dense, make_moe,  # noqa: E402
                           moe_forward, reps_for, routing_scores, time_us)
from provenance import provenance  # noqa: E402

from d2dmoe_kernels.configs import kernel_config  # noqa: E402

DEV = kernel_config(torch.cuda.get_device_name())
ROUTINGS = ((0.3, "independent"), (0.3, "shared"), (1.0, "independent"))
TOKENS = (4, 16, 64, 256, 1024, 4096, 16384)   # T = 1 is the fused decode kernel's
VARIANTS = {  # name: gemm config (None: the device's dispatch with the gemm path off)
    "device": None,
    "gemm-64x128": dict(BLOCK_T=64, BLOCK_C=128, num_warps=4),
    "gemm-32x256": dict(BLOCK_T=32, BLOCK_C=256, num_warps=4),
}


def config(variant):
    off = {k: {**v, "max_tokens": 0} for k, v in DEV.items() if k.startswith("gemm")}
    cfg = {**DEV, **off}
    if VARIANTS[variant] is not None:
        cfg["gemm"] = {**DEV["gemm"], **VARIANTS[variant], "min_tokens": 1, "max_tokens": 1 << 30}
    return cfg


def main(out, shapes):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    cfgs = {v: config(v) for v in VARIANTS}

    def save():
        (out / "24-probe-gemm-path.json").write_text(json.dumps(
            {**provenance(triton=triton.__version__), "dtype": "bfloat16", "variants": VARIANTS, "rows": rows},
            indent=1))

    for shape in shapes:
        d, dff, gated, act, width, sizes = SHAPES[shape]
        n = copies_for((3 if gated else 2) * d * dff * 2)
        dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
        for T in TOKENS:
            x = torch.randn(T, d, device="cuda", dtype=dtype)
            reps = reps_for(T)
            dense = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], reps))
            for es in sizes:
                moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
                E = dff // es
                counters = torch.zeros(3, dtype=torch.int64, device="cuda")
                for fraction, routing in ROUTINGS:
                    scores, real = routing_scores(T, E, fraction, routing, dtype)
                    row = dict(shape=shape, expert_size=es, tokens=T, fraction=round(real, 4), routing=routing,
                               dense_us=round(dense, 2))
                    for v, cfg in cfgs.items():
                        us = time_us(graphed([lambda w=w, c=cfg: moe_forward(x, scores, w, 0.99, act, counters, c)
                                              for w in moe_ws], reps))
                        row[v] = round(dense / us, 3)
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
                del moe_ws
                torch.cuda.empty_cache()
        save()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(",") if len(sys.argv) > 2 else list(SHAPES))
