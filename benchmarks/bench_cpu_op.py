"""The expert layer's CPU body (vLLM's CPU backend) against the dense MLP, one FFN layer, on this host.

    python benchmarks/bench_cpu_op.py [--threads 2] [--dtype float32]   # prints a table, writes JSON

Why: the CPU body runs whenever vLLM serves on its CPU backend; it must beat the dense MLP where
the executed fraction is low, or say where it does not. Shapes are the converter's defaults (32
experts per layer, router width 128): GPT-2 FFN (768 -> 3072, GELU -> ReLU experts, biases) and
Gemma 3 270M FFN (640 -> 2048, gated GELU-tanh). Routing is controlled: every token runs a random
``fraction`` of the experts (independent per token); the router's cost is included (its forward and
the selection rule run as in the op). Time = median of ``--repeats`` calls after warm-up,
``time.perf_counter``; dense = vLLM's layout (fused gate/up GEMM, act * mul, down GEMM, or
fc + bias, act, proj + bias; the weights of bench_kernels.py). Writes
``benchmarks/results/cpu-op-<dtype>-<threads>threads.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from bench_kernels import dense_forward, make_dense, make_moe
from provenance import ROOT, provenance

from d2dmoe_kernels.cpu import dynamic_k_experts_cpu
from d2dmoe_kernels.reference import router_scores, select_experts

SHAPES = {"gpt2-ffn": (768, 3072, False, "relu"), "gemma3-270m-ffn": (640, 2048, True, "gelu_tanh")}
TOKENS = (1, 8, 64, 512)
FRACTIONS = (0.1, 0.3, 0.5, 1.0)


def timed(fn, repeats):
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="T 1 and 8, 30%% of experts (a smoke run)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    rows = []
    with torch.inference_mode():
        for name, (d, dff, gated, act) in SHAPES.items():
            E, es, width = 32, dff // 32, 128
            dense_w = make_dense(d, dff, gated, dtype, device="cpu")
            moe_w = make_moe(d, dff, gated, es, width, dtype, device="cpu")
            r_in, r_out = moe_w.pop("router_in"), moe_w.pop("router_out")

            for T in (1, 8) if args.quick else TOKENS:
                x = torch.randn(T, d, generator=g).to(dtype)
                dense_us = timed(lambda: dense_forward(x, dense_w, gated, act), args.repeats)
                for fraction in (0.3,) if args.quick else FRACTIONS:
                    k = max(1, round(fraction * E))
                    mask = torch.zeros(T, E, dtype=torch.bool)
                    mask.scatter_(1, torch.rand(T, E, generator=g).argsort(dim=1)[:, :k], True)

                    def moe():
                        select_experts(router_scores(x, r_in, r_out), 0.5)  # the router's cost, as in the op
                        return dynamic_k_experts_cpu(x, mask, **moe_w, activation=act)

                    moe_us = timed(moe, args.repeats)
                    rows.append(dict(shape=name, expert_size=es, tokens=T, fraction=k / E, dense_us=round(dense_us, 1),
                                     d2dmoe_us=round(moe_us, 1), speedup=round(dense_us / moe_us, 3)))
                    print(f"{name:16s} T={T:<4d} f={k / E:4.2f} dense {dense_us:9.1f} us  d2dmoe {moe_us:9.1f} us  "
                          f"x{dense_us / moe_us:.2f}", flush=True)
    host = platform.node() or "host"
    result = {**provenance(), "host": host, "cpu": platform.processor() or platform.machine(), "threads": args.threads,
              "dtype": args.dtype, "method": __doc__.split("\n\n")[2].replace("\n", " "), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu-op-{args.dtype}-{args.threads}threads{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
