"""Attempt 31 (H200): where the GPT-2 masked path's time goes, kernel by kernel, under Nsight Compute.

At GPT-2 size the masked path is 0.79-0.88x of dense from 16 tokens up at 30% of experts while the tau=0
fallback on the same tiles is ~1.0x (attempts 19, 21: half of that gap unexplained). This runs, once each
under ``ncu --profile-from-start off``, GPT-2 e=64 at T = 64 and 256 (30%, independent routing): the dense
MLP, the layer on the device config (router first layer, masked kernel with the router's tail inside,
cuBLAS down GEMM) and the tau = 0 fallback (masked kernel MODE 3 + cuBLAS down). A ``torch.cuda._sleep``
kernel marks the start of each case in the report. Run as

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats \\
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \\
        python3 benchmarks/results/attempts/31-profile_masked_ncu.py > OUT/31-ncu.csv
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_kernels import SHAPES, dense_forward, make_dense, make_moe, moe_forward, routing_scores  # noqa: E402

from d2dmoe_kernels.configs import kernel_config  # noqa: E402
from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402


def main():
    torch.manual_seed(0)
    dtype = torch.bfloat16
    d, dff, gated, act, width, _ = SHAPES["gpt2-ffn"]
    es = 64
    E = dff // es
    cfg = kernel_config(torch.cuda.get_device_name())
    dense_w, moe_w = make_dense(d, dff, gated, dtype), make_moe(d, dff, gated, es, width, dtype)
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    cases = []
    for T in (64, 256):
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        routing, real = routing_scores(T, E, 0.3, "independent", dtype)
        cases += [(f"dense T={T}", lambda x=x: dense_forward(x, dense_w, gated, act)),
                  (f"d2dmoe T={T} f={real:.2f}", lambda x=x, r=routing: moe_forward(x, r, moe_w, 0.99, act, counters, cfg)),
                  (f"fallback T={T}", lambda x=x: dynamic_k_experts_triton(
                      x, moe_w["router_in"], moe_w["router_out"], 0.0, 0, moe_w["w_in"], moe_w["w_up"], moe_w["w_out"],
                      moe_w["b_in"], moe_w["b_out"], act, counters, cfg))]
    for _, fn in cases:  # compile and warm up outside the profiled range
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for i, (name, fn) in enumerate(cases):
        print(f"# case {i}: {name}", file=sys.stderr, flush=True)
        torch.cuda._sleep(1000 * (i + 1))  # marker kernel
        fn()
        torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
