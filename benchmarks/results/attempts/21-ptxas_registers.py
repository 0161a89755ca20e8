"""Attempt 21 (no GPU needed): registers, spills and shared memory of the masked up kernel, compiled
offline for sm_90 by the installed Triton and ptxas, with the JIT's divisibility-16 specialisation of
pointers, widths and strides (what a real launch gets). Compares the spanning tiles (MODE 0) with
the dense fallback's (MODE 3) at the tile configs of the H200 file; then the fused and the balanced
decode kernels at their Gemma-2B configs. Prints one line per config.

    python benchmarks/results/attempts/21-ptxas_registers.py [path/to/expert_masked.py]
"""

import importlib.util
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiles real kernels: unset TRITON_INTERPRET"
TYPES = {"ref_ptr": "*fp32", "tau": "fp32", "guard": "fp32", "counters_ptr": "*i64"}
DIVISIBLE = {"D", "ES", "E", "W", "stride_x", "stride_h", "stride_s"}
CONFIGS = [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 64, 8, 3)]


def compile_report(kernel, const, types, divisible, warps, stages):
    """'shared N B | ptxas register / spill lines' for one specialisation of ``kernel``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    sig = {n: "constexpr" if n in const else types.get(n, "*bf16" if n.endswith("_ptr") else "i32")
           for n in kernel.arg_names}
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in kernel.arg_names
             if n not in const and (n.endswith("_ptr") or n in divisible)}
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(c),): v for c, v in const.items()},
                    attrs=attrs)
    cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        open(ptx, "w").write(cc.asm["ptx"])
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", ptx, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    info = " ".join(line.split("info    :")[-1].strip() for line in (out.stdout + out.stderr).splitlines()
                    if "registers" in line or "spill" in line)
    return f"shared {cc.metadata.shared} B | {info}"


def decode_kernels():
    from d2dmoe_kernels.expert_decode_balanced import _balanced_decode_kernel
    from d2dmoe_kernels.expert_decode_fused import _fused_decode_kernel

    types = {"ref_ptr": "*fp32", "tau": "fp32", "guard": "fp32", "counters_ptr": "*i64", "part_ptr": "*fp32",
             "rscores_ptr": "*fp32", "rref_ptr": "*fp32"}
    divisible = {"D", "DO", "ES", "E", "stride_x", "stride_s", "stride_h"}
    for bj, bk, bn, warps, stages in ((64, 256, 256, 4, 3), (32, 256, 256, 4, 3), (64, 128, 256, 4, 4)):
        const = dict(GATED=True, HAS_BIAS=False, ACT=2, UPCAST=False, OWN_MAX=True, ROUTER=0, FULL_ROUTER=False,
                     BLOCK_T=16, BLOCK_EALL=64, BLOCK_J=bj, BLOCK_K=bk, BLOCK_N=bn, BLOCK_RE=64, BLOCK_RW=128)
        print(f"fused Gemma-2B e=256 J{bj} K{bk} N{bn} {warps} warps {stages} stages | "
              + compile_report(_fused_decode_kernel, const, types, divisible, warps, stages), flush=True)
    for bj, bk, bn, warps, stages in ((32, 128, 256, 4, 4), (32, 128, 512, 4, 4)):
        const = dict(GATED=True, HAS_BIAS=False, ACT=2, UPCAST=False, OWN_MAX=True, BLOCK_T=16, BLOCK_EALL=64,
                     BLOCK_J=bj, BLOCK_K=bk, BLOCK_N=bn)
        print(f"balanced Gemma-2B e=256 J{bj} K{bk} N{bn} {warps} warps {stages} stages | "
              + compile_report(_balanced_decode_kernel, const, types, divisible, warps, stages), flush=True)


def main(path):
    spec = importlib.util.spec_from_file_location("masked_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernel = mod._masked_up_kernel
    for mode, gated in ((0, False), (0, True), (3, False), (3, True)):
        for bt, bj, bk, warps, stages in CONFIGS:
            const = dict(GATED=gated, HAS_BIAS=not gated, ACT=0, UPCAST=False, MODE=mode, FULL_ROUTER=False,
                         BLOCK_T=bt, BLOCK_J=bj, BLOCK_K=bk, BLOCK_E=16, BLOCK_W=16)
            print(f"MODE {mode} {'gated' if gated else 'plain'} tile {bt}x{bj}x{bk} {warps} warps {stages} stages | "
                  + compile_report(kernel, const, TYPES, DIVISIBLE, warps, stages), flush=True)


if __name__ == "__main__":
    decode_kernels()
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "..", "kernels",
                                                             "expert_masked.py"))
