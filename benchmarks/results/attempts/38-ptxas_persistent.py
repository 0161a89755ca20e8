"""Attempt 38 (no GPU needed): the one-launch decode kernel (``expert_decode_persistent.py``) with its
grid barriers (PHASE 0) compiled offline for sm_90 at the Gemma-2B and GPT-2 T=1 blocks: it compiles,
registers / spills / shared memory, and the barrier's PTX (acq_rel arrival, ld.acquire polling).
Reuses attempt 21's compile_report. (Run first on the version with contiguous ranges per program,
which spilled 1.7-2.1 KB at the Gemma-2B blocks with 32 KB of shared memory -- its streams not
multi-buffered -- against 0 spills / 74-117 KB for round-robin slices; the slices are what remains.)

    python benchmarks/results/attempts/38-ptxas_persistent.py
"""

import importlib.util
import os
import re

spec = importlib.util.spec_from_file_location("a21", os.path.join(os.path.dirname(__file__), "21-ptxas_registers.py"))
a21 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(a21)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from d2dmoe_kernels.expert_decode_persistent import _persistent_decode_kernel as k  # noqa: E402

types = {"ref_ptr": "*fp32", "tau": "fp32", "guard": "fp32", "counters_ptr": "*i64", "part_ptr": "*fp32",
         "scores_ptr": "*bf16", "sel_ptr": "*i8", "n_ptr": "*i32", "bar_ptr": "*i32"}
divisible = {"D", "DO", "ES", "E", "W", "stride_x", "stride_s", "stride_o"}
for name, gated, eall, r, bk, bn, stages in (("gemma-2b", True, 64, 64, 128, 128, 3), ("gemma-2b", True, 64, 64, 128, 256, 4),
                                             ("gpt2", False, 64, 32, 256, 256, 3)):
    if True:
        const = dict(GATED=gated, HAS_B_IN=not gated, HAS_B_OUT=not gated, ACT=2 if gated else 0, UPCAST=False,
                     ROUTER=1, HAS_REF=False, PHASE=0, PDL=True, ONE_TOKEN=True, BLOCK_T=16,
                     BLOCK_EALL=eall, BLOCK_HW=16, BLOCK_HK=256, BLOCK_RW=64, BLOCK_R=r, BLOCK_K=bk, BLOCK_N=bn,
                     BLOCK_NR=16, BLOCK_S=256)
        try:
            report = a21.compile_report(k, const, types, divisible, 4, stages)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile is a result here
            report = f"error: {type(exc).__name__}: {str(exc)[:600]}"
        print(f"{name} R{r} K{bk} N{bn} {stages} stages | {report}", flush=True)

const = dict(GATED=True, HAS_B_IN=False, HAS_B_OUT=False, ACT=2, UPCAST=False, ROUTER=1, HAS_REF=False, PHASE=0, PDL=True,
             ONE_TOKEN=True, BLOCK_T=16, BLOCK_EALL=64, BLOCK_HW=16, BLOCK_HK=256, BLOCK_RW=64,
             BLOCK_R=64, BLOCK_K=128, BLOCK_N=128, BLOCK_NR=16, BLOCK_S=256)
sig = {n: "constexpr" if n in const else types.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in k.arg_names}
cc = triton.compile(ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(c),): v for c, v in const.items()}),
                    target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
ptx = cc.asm["ptx"]
print("barrier PTX:", sorted({[t for t in ln.split() if not t.startswith("@")][0] for ln in ptx.splitlines()
                              if "atom" in ln or "ld.acquire" in ln}),
      "griddepcontrol:", len(re.findall(r"griddepcontrol", ptx)))
