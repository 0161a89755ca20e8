"""Attempts 17-18 probe (H200). 17: the balanced decode kernel against the fused one at T = 1 and 3,
10 / 30 / 50% of experts (the fused kernel's idle programs grow as the fraction falls), Gemma-2B FFN
e = 256, 512, with a few launch configs. 18: masked-path launch configs at T = 16 / 64 / 256 for the
Gemma-2B FFN (the H100 choice streams ~3.0 TB/s on the H200). Same timing as bench_kernels.py
(CUDA graphs of back-to-back calls, weights rotated beyond L2, router paid, controlled routing).
Writes 17-probe-balanced-masked.json with provenance."""

import json
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_kernels import (SHAPES, copies_for, dense_forward, graphed, make_dense, make_moe,  # noqa: E402
                           reps_for, routing_scores, time_us)
from provenance import provenance  # noqa: E402

from d2dmoe_kernels.configs import kernel_config  # noqa: E402
from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402

DEV = kernel_config(torch.cuda.get_device_name())
BAL = [dict(programs_per_sm=p, BLOCK_J=j, BLOCK_K=k, BLOCK_N=n, num_warps=w, num_stages=s, BLOCK_N_REDUCE=64)
       for p, j, k, n, w, s in [(2, 32, 128, 256, 4, 4), (1, 64, 128, 256, 4, 4), (2, 64, 128, 256, 4, 3),
                                (1, 64, 256, 512, 4, 3), (2, 32, 128, 512, 4, 4), (1, 32, 128, 512, 4, 4),
                                (2, 32, 64, 256, 4, 4), (3, 32, 128, 256, 4, 4)]]
MASKED = [dict(BLOCK_T=bt, BLOCK_J=j, BLOCK_K=k, num_warps=w, num_stages=s)
          for bt, j, k, w, s in [(64, 32, 256, 4, 3), (64, 64, 128, 4, 3), (64, 64, 128, 4, 4), (64, 64, 64, 4, 5),
                                 (64, 128, 64, 8, 3), (64, 128, 64, 8, 4), (64, 64, 256, 8, 3), (64, 32, 128, 4, 4),
                                 (64, 32, 128, 4, 5), (64, 128, 128, 8, 3), (32, 64, 128, 4, 4), (16, 64, 128, 4, 4),
                                 (16, 128, 128, 4, 4), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3)]]


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    d, dff, gated, act, width, _ = SHAPES["gemma-2b-ffn"]
    n = copies_for(3 * d * dff * 2)
    dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
    for es in (256, 512):
        moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
        E = dff // es
        counters = torch.zeros(3, dtype=torch.int64, device="cuda")

        def t(label, cfg, x, routing, reps, **extra):
            fns = [lambda w=w: dynamic_k_experts_triton(x, w["router_in"], w["router_out"], 0.99, 0, w["w_in"],
                                                        w["w_up"], w["w_out"], w["b_in"], w["b_out"], act, counters,
                                                        cfg, route_override=routing) for w in moe_ws]
            try:
                us = time_us(graphed(fns, reps))
            except Exception as exc:
                print(f"e={es} {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                return
            rows.append(dict(expert_size=es, what=label, us=round(us, 2), **extra))
            print(f"e={es:<4d} {label:70s} {us:8.2f} us", flush=True)

        for T in (1, 3):
            x = torch.randn(T, d, device="cuda", dtype=dtype)
            dense = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], 32))
            rows.append(dict(expert_size=es, what="dense", us=round(dense, 2), tokens=T))
            print(f"e={es} T={T} dense {dense:.2f} us", flush=True)
            for frac in (0.1, 0.3, 0.5):
                routing, real = routing_scores(T, E, frac, "independent", dtype)
                t(f"T={T} f={real:.2f} fused (device config)", DEV, x, routing, 32, tokens=T, fraction=real, path="fused")
                for c in BAL:
                    cfg = {**DEV, f"balanced@d{d}e{es}": {**c, "max_tokens": 4}}
                    t(f"T={T} f={real:.2f} balanced {c}", cfg, x, routing, 32, tokens=T, fraction=real,
                      path="balanced", config=c)
        for T in ((16, 64, 256) if es == 256 else (64,)):
            x = torch.randn(T, d, device="cuda", dtype=dtype)
            reps = reps_for(T)
            dense = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], reps))
            rows.append(dict(expert_size=es, what="dense", us=round(dense, 2), tokens=T))
            print(f"e={es} T={T} dense {dense:.2f} us", flush=True)
            routing, real = routing_scores(T, E, 0.3, "independent", dtype)
            t(f"T={T} f={real:.2f} masked (device config)", DEV, x, routing, reps, tokens=T, fraction=real, path="masked")
            for c in MASKED:
                cfg = {**DEV, f"masked@d{d}e{es}": {"by_tokens": [[1 << 30, c]]}}
                t(f"T={T} f={real:.2f} masked {c}", cfg, x, routing, reps, tokens=T, fraction=real, path="masked",
                  config=c)
        del moe_ws
        torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "17-probe-balanced-masked.json").write_text(json.dumps(
        {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
