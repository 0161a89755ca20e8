"""Attempt 35 (no GPU needed): the fused decode kernel and the router launches compiled offline for
sm_90 with the L2 bulk prefetch on and off (PTX through ptxas): the inline PTX assembles, and what
it costs in registers. Reuses attempt 21's compile_report.

    python benchmarks/results/attempts/35-ptxas_prefetch.py
"""

import importlib.util
import os

spec = importlib.util.spec_from_file_location("a21", os.path.join(os.path.dirname(__file__), "21-ptxas_registers.py"))
a21 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(a21)

from d2dmoe_kernels.expert_decode_fused import _fused_decode_kernel  # noqa: E402
from d2dmoe_kernels.router_tail import _router_hidden_kernel, _router_tail_kernel  # noqa: E402

types = {"ref_ptr": "*fp32", "tau": "fp32", "guard": "fp32", "counters_ptr": "*i64", "part_ptr": "*fp32",
         "rscores_ptr": "*fp32", "rref_ptr": "*fp32", "scores_ptr": "*fp32", "rowmax_ptr": "*fp32"}
divisible = {"D", "DO", "ES", "E", "stride_x", "stride_s", "stride_h"}
for prefetch in (0, 1, 2, 3):
    const = dict(GATED=True, HAS_BIAS=False, ACT=2, UPCAST=False, OWN_MAX=True, ROUTER=0, FULL_ROUTER=False,
                 BLOCK_T=16, BLOCK_EALL=64, BLOCK_J=64, BLOCK_K=128, BLOCK_N=256, BLOCK_RE=64, BLOCK_RW=128,
                 PDL=True, PREFETCH=prefetch, THREADS=128, TMA=False)
    print(f"fused Gemma-2B e=256 T=1 tier PREFETCH={prefetch} | "
          + a21.compile_report(_fused_decode_kernel, const, types, divisible, 4, 4), flush=True)
for prefetch in (0, 1):
    const = dict(UPCAST=False, BLOCK_T=16, BLOCK_W=16, BLOCK_K=256, PDL=True, PREFETCH=prefetch, THREADS=128)
    print(f"router hidden PREFETCH={prefetch} | "
          + a21.compile_report(_router_hidden_kernel, const, types, {"D", "W", "stride_x"}, 4, 3), flush=True)
    const = dict(UPCAST=False, BLOCK_T=16, BLOCK_E=64, BLOCK_W=128, ROWMAX=False, PDL=True, PREFETCH=prefetch,
                 THREADS=128)
    print(f"router tail PREFETCH={prefetch} | "
          + a21.compile_report(_router_tail_kernel, const, types, {"E", "W", "stride_h", "stride_s"}, 4, 3), flush=True)
