"""Attempt 36 (no GPU needed): the fused decode kernel with its weight tiles through tensor
descriptors (TMA), compiled offline for sm_90 next to the pointer-load kernel at the H200 file's
Gemma-2B T=1 tier (and two other tiles): it compiles, what it costs in registers and shared memory,
and whether the PTX holds bulk tensor copies. Reuses attempt 21's compile_report.

    python benchmarks/results/attempts/36-ptxas_tma.py
"""

import importlib.util
import os

spec = importlib.util.spec_from_file_location("a21", os.path.join(os.path.dirname(__file__), "21-ptxas_registers.py"))
a21 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(a21)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from d2dmoe_kernels.expert_decode_fused import _fused_decode_kernel  # noqa: E402

divisible = {"D", "DO", "ES", "E", "stride_x", "stride_s", "stride_h"}
for bj, bk, bn, stages in ((64, 128, 256, 4), (64, 64, 64, 6), (64, 128, 128, 4)):
    for tma in (False, True):
        types = {"ref_ptr": "*fp32", "tau": "fp32", "guard": "fp32", "counters_ptr": "*i64", "part_ptr": "*fp32",
                 "rscores_ptr": "*fp32", "rref_ptr": "*fp32", "scores_ptr": "*fp32"}
        if tma:
            types |= {"w_in_ptr": f"tensordesc<bf16[{bj}, {bk}]>", "w_up_ptr": f"tensordesc<bf16[{bj}, {bk}]>",
                      "w_out_ptr": f"tensordesc<bf16[{bj}, {bn}]>"}
        const = dict(GATED=True, HAS_BIAS=False, ACT=2, UPCAST=False, OWN_MAX=True, ROUTER=0, FULL_ROUTER=False,
                     BLOCK_T=16, BLOCK_EALL=256, BLOCK_J=bj, BLOCK_K=bk, BLOCK_N=bn, BLOCK_RE=64, BLOCK_RW=128,
                     PDL=True, PREFETCH=0, THREADS=128, TMA=tma)
        try:
            report = a21.compile_report(_fused_decode_kernel, const, types, divisible - ({"D", "DO"} if tma else set()),
                                        4, stages)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result here
            report = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"fused J{bj} K{bk} N{bn} {stages} stages TMA={tma} | {report}", flush=True)

# What the TMA kernel's PTX moves weights with (the T=1 tier's blocks): bulk tensor copies, no cp.async.
import re  # noqa: E402

const = dict(GATED=True, HAS_BIAS=False, ACT=2, UPCAST=False, OWN_MAX=True, ROUTER=0, FULL_ROUTER=False, BLOCK_T=16,
             BLOCK_EALL=256, BLOCK_J=64, BLOCK_K=128, BLOCK_N=256, BLOCK_RE=64, BLOCK_RW=128, PDL=True, PREFETCH=0,
             THREADS=128, TMA=True)
types = {"ref_ptr": "*fp32", "tau": "fp32", "guard": "fp32", "counters_ptr": "*i64", "part_ptr": "*fp32",
         "rscores_ptr": "*fp32", "rref_ptr": "*fp32", "scores_ptr": "*fp32", "w_in_ptr": "tensordesc<bf16[64, 128]>",
         "w_up_ptr": "tensordesc<bf16[64, 128]>", "w_out_ptr": "tensordesc<bf16[64, 256]>"}
k = _fused_decode_kernel
sig = {n: "constexpr" if n in const else types.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in k.arg_names}
cc = triton.compile(ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(c),): v for c, v in const.items()}),
                    target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 4})
ptx = cc.asm["ptx"]
print(f"TMA PTX: {len(re.findall(r'cp[.]async[.]bulk[.]tensor', ptx))} bulk tensor copies, "
      f"{len(re.findall(r'cp[.]async[.]c[ag]', ptx))} cp.async, mbarrier {'mbarrier' in ptx}")
