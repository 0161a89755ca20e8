"""Attempt 21 (no GPU needed): registers, spills and shared memory of the masked up kernel, compiled
offline for sm_90 by the installed Triton and ptxas, with the JIT's divisibility-16 specialisation of
pointers, widths and strides (what a real launch gets). Compares the spanning tiles (MODE 0) with
the dense fallback's (MODE 3) at the tile configs of the H200 file. Prints one line per config.

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
ARGS = ["x_ptr", "hid_ptr", "w1_ptr", "w2_ptr", "scores_ptr", "ref_ptr", "tau", "guard", "w_in_ptr", "w_up_ptr",
        "b_in_ptr", "h_ptr", "counters_ptr", "T", "D", "ES", "E", "ER", "W", "E_OFF", "PAIRS", "stride_x", "stride_h",
        "stride_s"]
TYPES = {"ref_ptr": "*fp32", "tau": "fp32", "guard": "fp32", "counters_ptr": "*i64"}
DIVISIBLE = {"D", "ES", "E", "W", "stride_x", "stride_h", "stride_s"}
CONFIGS = [(128, 128, 64, 8, 3), (64, 128, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 64, 8, 3)]


def main(path):
    spec = importlib.util.spec_from_file_location("masked_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    kernel = mod._masked_up_kernel
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    for mode, gated in ((0, False), (0, True), (3, False), (3, True)):
        for bt, bj, bk, warps, stages in CONFIGS:
            const = dict(GATED=gated, HAS_BIAS=not gated, ACT=0, UPCAST=False, MODE=mode, FULL_ROUTER=False,
                         BLOCK_T=bt, BLOCK_J=bj, BLOCK_K=bk, BLOCK_E=16, BLOCK_W=16)
            sig = {n: TYPES.get(n, "*bf16" if n.endswith("_ptr") else "i32") for n in ARGS} | {c: "constexpr" for c in const}
            attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]]
                     for n in ARGS if n.endswith("_ptr") or n in DIVISIBLE}
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
            print(f"MODE {mode} {'gated' if gated else 'plain'} tile {bt}x{bj}x{bk} {warps} warps {stages} stages | "
                  f"shared {cc.metadata.shared} B | {info}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "..", "kernels",
                                                             "expert_masked.py"))
