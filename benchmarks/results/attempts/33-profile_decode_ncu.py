"""Attempt 33 (H200): where the decode path's time goes at T = 1, kernel by kernel, under Nsight Compute.

GPT-2 T=1 is 1.19x of dense (bar 1.3x), Gemma-2B e=256 1.90x (bar 2.5x, bytes allow 3.3x). This runs, once
each, the dense MLP and the layer on the device config (router first layer, fused decode kernel, reduction)
at 30% of experts, independent routing: GPT-2 e=64, Gemma 3 270M e=64, Gemma-2B e=256. Same method as
attempt 31 (``31-profile_masked_ncu.py``: a ``torch.cuda._sleep`` kernel marks each case). Run as

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section LaunchStats \\
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --csv --page details \\
        python3 benchmarks/results/attempts/33-profile_decode_ncu.py > OUT/33-ncu.csv
"""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_kernels import SHAPES, dense_forward, make_dense, make_moe, moe_forward, routing_scores  # noqa: E402

from d2dmoe_kernels.configs import kernel_config  # noqa: E402


def main():
    torch.manual_seed(0)
    dtype = torch.bfloat16
    cfg = kernel_config(torch.cuda.get_device_name())
    counters = torch.zeros(3, dtype=torch.int64, device="cuda")
    cases = []
    for shape, es in (("gpt2-ffn", 64), ("gemma3-270m-ffn", 64), ("gemma-2b-ffn", 256)):
        d, dff, gated, act, width, _ = SHAPES[shape]
        dense_w, moe_w = make_dense(d, dff, gated, dtype), make_moe(d, dff, gated, es, width, dtype)
        x = torch.randn(1, d, device="cuda", dtype=dtype)
        routing, real = routing_scores(1, dff // es, 0.3, "independent", dtype)
        cases += [(f"dense {shape}", lambda x=x, w=dense_w, g=gated, a=act: dense_forward(x, w, g, a)),
                  (f"d2dmoe {shape} e={es} f={real:.2f}",
                   lambda x=x, r=routing, w=moe_w, a=act: moe_forward(x, r, w, 0.99, a, counters, cfg))]
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
