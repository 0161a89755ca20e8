"""Attempt 23 probe (H200): launch configs of the fused decode kernel that the tuner never tried
(2 and 4 pipeline stages, 8 warps, 128-neuron slices) at T = 1 and 3, 10 / 30 / 50% of experts,
Gemma-2B FFN e = 256, 512, and GPT-2 FFN e = 64, 128 at T = 1, 30%. Hypothesis (attempt 21's offline
compile): the device config (64 x 256 tiles, 3 stages, 4 warps) takes 147 KB of shared memory and 255
registers, one program per SM; configs at <= 84 KB fit two or more per SM. Same timing as
bench_kernels.py (CUDA graphs of back-to-back calls, weights rotated beyond L2, router paid,
controlled routing). Writes 23-probe-fused-stages.json with provenance after every group.

    python benchmarks/results/attempts/23-probe_fused_stages.py OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import triton

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_kernels import (SHAPES, copies_for, dense_forward, graphed, make_dense, make_moe,  # noqa: E402
                           routing_scores, time_us)
from provenance import provenance  # noqa: E402

from d2dmoe_kernels.configs import kernel_config  # noqa: E402
from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402

DEV = kernel_config(torch.cuda.get_device_name())
BIG = [dict(BLOCK_J=j, BLOCK_K=k, num_warps=w, num_stages=s) for j, k, w, s in [
    (64, 256, 4, 3), (64, 256, 4, 2), (64, 256, 8, 3), (64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 8, 3),
    (64, 64, 4, 4), (32, 256, 4, 3), (32, 128, 4, 3), (32, 128, 4, 4), (128, 128, 8, 3), (128, 64, 8, 4)]]
SMALL = [dict(BLOCK_J=j, BLOCK_K=k, num_warps=w, num_stages=s) for j, k, w, s in [
    (32, 256, 4, 3), (32, 256, 4, 2), (32, 128, 4, 3), (32, 256, 8, 3), (16, 256, 4, 3), (64, 256, 4, 3),
    (64, 128, 4, 4)]]


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "23-probe-fused-stages.json").write_text(json.dumps(
            {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))

    for shape, sizes, tokens, fractions, grid in (("gemma-2b-ffn", (256, 512), (1, 3), (0.1, 0.3, 0.5), BIG),
                                                   ("gpt2-ffn", (64, 128), (1,), (0.3,), SMALL)):
        d, dff, gated, act, width, _ = SHAPES[shape]
        n = copies_for(3 * d * dff * 2)
        dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
        for es in sizes:
            moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
            E = dff // es
            counters = torch.zeros(3, dtype=torch.int64, device="cuda")
            key = f"fused@d{d}e{es}"
            for T in tokens:
                x = torch.randn(T, d, device="cuda", dtype=dtype)
                dense = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], 32))
                rows.append(dict(shape=shape, expert_size=es, tokens=T, what="dense", us=round(dense, 2)))
                print(f"{shape} e={es} T={T} dense {dense:.2f} us", flush=True)
                for frac in fractions:
                    routing, real = routing_scores(T, E, frac, "independent", dtype)
                    for c in [None] + grid:
                        cfg = DEV if c is None else {**DEV, key: {**DEV.get(key, {}), **c}}
                        fns = [lambda w=w: dynamic_k_experts_triton(
                            x, w["router_in"], w["router_out"], 0.99, 0, w["w_in"], w["w_up"], w["w_out"], w["b_in"],
                            w["b_out"], act, counters, cfg, route_override=routing) for w in moe_ws]
                        label = "device config" if c is None else str(c)
                        try:
                            us = time_us(graphed(fns, 32))
                        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result
                            print(f"  {label}: FAILED {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                            continue
                        rows.append(dict(shape=shape, expert_size=es, tokens=T, fraction=real, what=label,
                                         config=c, us=round(us, 2), speedup=round(dense / us, 3)))
                        print(f"  e={es} T={T} f={real:.2f} {label:70s} {us:8.2f} us {dense / us:5.2f}x", flush=True)
                    save()
            del moe_ws
            torch.cuda.empty_cache()
        del dense_ws
    save()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
