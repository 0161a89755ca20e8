"""The expert layer's CPU body (vLLM's CPU backend) against the dense MLP, one FFN layer, on this host.

    python benchmarks/bench_cpu_op.py [--threads 2] [--dtype float32]   # prints a table, writes JSON

Why: the CPU body runs whenever vLLM serves on its CPU backend; it must beat the dense MLP where
the executed fraction is low, or say where it does not. Shapes are the converter's defaults (32
experts per layer, router width 128): GPT-2 FFN (768 -> 3072, GELU -> ReLU experts, biases) and
Gemma 3 270M FFN (640 -> 2048, gated GELU-tanh). Routing is controlled: every token runs a random
``fraction`` of the experts (independent per token); the router's cost is included (its forward and
the selection rule run as in the op). Time = median of ``--repeats`` calls after warm-up,
``time.perf_counter``; dense = vLLM's layout (fused gate/up GEMM, act * mul, down GEMM, or
fc + bias, act, proj + bias). Writes ``benchmarks/results/cpu-op-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from provenance import ROOT, provenance

from d2dmoe_kernels.cpu import dynamic_k_experts_cpu
from d2dmoe_kernels.reference import apply_activation, router_scores, select_experts

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
    r = lambda *s: (torch.randn(*s, generator=g) / s[-1] ** 0.5).to(dtype)  # noqa: E731
    rows = []
    with torch.inference_mode():
        for name, (d, dff, gated, act) in SHAPES.items():
            E, es, width = 32, dff // 32, 128
            w_gu, w_down = r(2 * dff if gated else dff, d), r(d, dff)
            b_fc, b_proj = (None, None) if gated else (r(dff), r(d))
            experts = dict(w_in=r(E, es, d), w_up=r(E, es, d) if gated else None, w_out=r(E, es, d),
                           b_in=None if gated else r(E, es), b_out=None if gated else r(d))
            r_in, r_out = r(width, d), r(E, width)

            def dense(x):
                if gated:
                    gate, up = F.linear(x, w_gu).chunk(2, dim=-1)
                    return F.linear(apply_activation(gate, act) * up, w_down)
                return F.linear(apply_activation(F.linear(x, w_gu, b_fc), act), w_down, b_proj)

            for T in (1, 8) if args.quick else TOKENS:
                x = torch.randn(T, d, generator=g).to(dtype)
                dense_us = timed(lambda: dense(x), args.repeats)
                for fraction in (0.3,) if args.quick else FRACTIONS:
                    k = max(1, round(fraction * E))
                    mask = torch.zeros(T, E, dtype=torch.bool)
                    mask.scatter_(1, torch.rand(T, E, generator=g).argsort(dim=1)[:, :k], True)

                    def moe():
                        select_experts(router_scores(x, r_in, r_out), 0.5)  # the router's cost, as in the op
                        return dynamic_k_experts_cpu(x, mask, **experts, activation=act)

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
