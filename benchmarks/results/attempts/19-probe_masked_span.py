"""Attempt 19 probe (H200): the masked path on given scores with tiles over the E*e neurons end to
end (one tile spans several small experts), router outside the kernel, against the device config
(router tail in the kernel, one expert per tile), GPT-2 and Gemma 3 270M FFN, e = 32 / 64 / 128,
30% of experts, independent routing. Same timing as bench_kernels.py. Writes 19-probe-masked-span.json."""

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
CANDS = [dict(BLOCK_T=bt, BLOCK_J=j, BLOCK_K=k, num_warps=w, num_stages=s)
         for bt, j, k, w, s in [(64, 64, 128, 4, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 3)]]


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    for name in ("gpt2-ffn", "gemma3-270m-ffn"):
        d, dff, gated, act, width, sizes = SHAPES[name]
        n = copies_for((3 if gated else 2) * d * dff * 2)
        dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
        for es in sizes:
            moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
            E = dff // es
            counters = torch.zeros(3, dtype=torch.int64, device="cuda")
            for T in (256, 4096, 16384):
                x = torch.randn(T, d, device="cuda", dtype=dtype)
                reps = reps_for(T)
                dense = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], reps))
                routing, real = routing_scores(T, E, 0.3, "independent", dtype)

                def t(label, cfg, **extra):
                    fns = [lambda w=w: dynamic_k_experts_triton(x, w["router_in"], w["router_out"], 0.99, 0, w["w_in"],
                                                                w["w_up"], w["w_out"], w["b_in"], w["b_out"], act,
                                                                counters, cfg, route_override=routing) for w in moe_ws]
                    try:
                        us = time_us(graphed(fns, reps))
                    except Exception as exc:
                        print(f"{name} e={es} T={T} {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                        return
                    rows.append(dict(shape=name, expert_size=es, tokens=T, fraction=real, what=label, us=round(us, 2),
                                     dense_us=round(dense, 2), speedup=round(dense / us, 3), **extra))
                    print(f"{name:16s} e={es:<4d} T={T:<6d} {label:60s} {us:8.2f} us  x{dense / us:.2f}", flush=True)

                t("device config", DEV)
                for c in CANDS:
                    t(f"span {c}", {**DEV, f"masked@d{d}e{es}": {"own_router": False, "max_tokens": 1 << 30,
                                                                  "by_tokens": [[1 << 30, c]]}}, config=c)
            del moe_ws
            torch.cuda.empty_cache()
    out.mkdir(parents=True, exist_ok=True)
    (out / "19-probe-masked-span.json").write_text(json.dumps(
        {**provenance(triton=triton.__version__), "dtype": "bfloat16", "rows": rows}, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
