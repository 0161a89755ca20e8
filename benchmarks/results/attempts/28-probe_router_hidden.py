"""Attempt 28 probe (H200): the router's first layer as a Triton launch instead of cuBLAS, at small T.

Hypothesis: at T = 1 the router's first layer (Gemma-2B: [1, 2048] x [2048, 512], 2 MB; GPT-2:
[1, 768] x [768, 128], 196 KB) costs 5.2 / 3.6 us through cuBLAS (attempt 9), more than its bytes, and
cuBLAS cannot launch as a programmatic dependent. A Triton launch over 16-unit blocks of the hidden
layer (``router.hidden_max_tokens``), PDL on, predicted: -1 to -2 us per layer at T <= 4 (Gemma-2B e=256
T=1 30%: 31.9 -> ~30 us; GPT-2 T=1: 13.2 -> ~12 us). Same timing as bench_kernels.py; every row times
the device config (PDL on since attempt 26), variants of the Triton first layer, and the device config again.

    python benchmarks/results/attempts/28-probe_router_hidden.py OUT_DIR
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


def with_hidden(**over):
    return {**DEV, "router": {**DEV["router"], "hidden_max_tokens": 64, **over}}


VARIANTS = {
    "device": DEV,
    "hidden w16 k256": with_hidden(HIDDEN_BLOCK_W=16, HIDDEN_BLOCK_K=256),
    "hidden w16 k128": with_hidden(HIDDEN_BLOCK_W=16, HIDDEN_BLOCK_K=128),
    "hidden w32 k128": with_hidden(HIDDEN_BLOCK_W=32, HIDDEN_BLOCK_K=128),
    "hidden w16 k512 8w": with_hidden(HIDDEN_BLOCK_W=16, HIDDEN_BLOCK_K=512, HIDDEN_num_warps=8),
    "device again": DEV,
}
PLAN = (("gemma-2b-ffn", (256, 512), (1, 3, 16), (0.1, 0.3, 0.5)),
        ("gpt2-ffn", (64, 128), (1, 4, 16), (0.3,)),
        ("gemma3-270m-ffn", (64, 128), (1, 4, 16), (0.3,)))


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    out.mkdir(parents=True, exist_ok=True)
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
                    line = f"{shape:16s} e={es:3d} T={T:3d} f={real:.2f} dense {dense:6.2f}"
                    for label, cfg in VARIANTS.items():
                        us = moe_us(x, routing, moe_ws, 0.99, act, counters, reps, cfg)
                        rows.append(dict(shape=shape, expert_size=es, tokens=T, fraction=real, config=label,
                                         dense_us=round(dense, 2), us=round(us, 2), speedup=round(dense / us, 3)))
                        line += f" | {label} {us:6.2f}"
                    print(line, flush=True)
                (out / "28-probe-router-hidden.json").write_text(json.dumps(
                    {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))
            del moe_ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
