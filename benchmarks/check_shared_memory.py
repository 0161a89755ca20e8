"""Does every masked-path tile of every device file fit shared memory, for 2- and 4-byte weights?

No GPU needed: the masked up kernel is compiled offline for sm_90 by the installed Triton (what a launch on
an H100 / H200 would build) at each distinct tile of each device file's ``masked`` keys and token tiers, with
the fp32 rule the launcher applies (``for_element_size`` over ``expert_masked.TILE_WIDTHS``), gated experts
(the larger case: w_in and w_up tiles) and given scores (the dense fallback's tiles are the same). Prints one line per tile
and exits 1 if any asks more than the device's 227 KB per block. Written after the fp32 GPU test failed on
an H100 at Gemma-2B size and 64 tokens (OutOfResources; docs/kernels.md attempt 40).

    python benchmarks/check_shared_memory.py [--files NVIDIA_H100_80GB_HBM3,...]
"""

import argparse
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "compiles real kernels: unset TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from d2dmoe_kernels.configs import CONFIG_DIR, for_element_size, kernel_config, path_config, token_tier  # noqa: E402
from d2dmoe_kernels.expert_masked import TILE_WIDTHS, _masked_up_kernel  # noqa: E402

SHARED_LIMIT = 232448  # bytes per block, opt-in maximum on sm_90 (H100, H200)
TILE_KEYS = ("BLOCK_T", "BLOCK_J", "BLOCK_K", "num_warps", "num_stages")


def device_names(only: list[str]) -> list[str]:
    """The device files' names (``NVIDIA_H200.json`` -> "NVIDIA H200"), or ``only``."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json") if p.stem not in ("default", "fallbacks"))
    return [n.replace("_", " ") for n in (only or names)]


def masked_tiles(cfg: dict) -> set[tuple]:
    """Every distinct tile a ``masked`` key of ``cfg`` can launch with: the key's own blocks over the path's,
    and each token tier (``by_tokens``, ``fallback_by_tokens``) over those."""
    tiles = set()
    for key in cfg:
        shape = re.fullmatch(r"masked(?:@d(\d+)(?:e(\d+))?)?", key)  # "masked", "masked@d2048", "masked@d2048e256"
        if not shape:
            continue
        base = path_config(cfg, "masked", int(shape[1] or 0), int(shape[2] or 0))
        tiers = [base] + [token_tier(base, bound, k) for k in ("by_tokens", "fallback_by_tokens") for bound, _ in base.get(k, ())]
        tiles.update(tuple(t[k] for k in TILE_KEYS) for t in tiers)
    return tiles


def shared_bytes(tile: tuple, dtype: str, widths=TILE_WIDTHS) -> int:
    """Shared memory of the masked up kernel compiled for sm_90 at ``tile`` (launcher's fp32 rule applied)."""
    cfg = dict(zip(TILE_KEYS, tile))
    cfg = for_element_size(cfg, 4 if dtype == "fp32" else 2, widths)
    k = _masked_up_kernel
    types = {"ref_ptr": "*fp32", "tau": "fp32", "guard": "fp32", "counters_ptr": "*i64"}
    const = dict(GATED=True, HAS_BIAS=False, ACT=2, UPCAST=dtype == "fp32", MODE=0, FULL_ROUTER=False, SPAN=False,
                 BLOCK_T=cfg["BLOCK_T"], BLOCK_J=cfg["BLOCK_J"], BLOCK_K=cfg["BLOCK_K"], BLOCK_E=16, BLOCK_W=16,
                 PDL=False)
    sig = {n: "constexpr" if n in const else types.get(n, f"*{dtype}" if n.endswith("_ptr") else "i32")
           for n in k.arg_names}
    attrs = {(k.arg_names.index(n),): [["tt.divisibility", 16]] for n in k.arg_names
             if n not in const and (n.endswith("_ptr") or n in ("D", "ES", "E", "W", "stride_x", "stride_h"))}
    src = ASTSource(fn=k, signature=sig, constexprs={(k.arg_names.index(c),): v for c, v in const.items()}, attrs=attrs)
    cc = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    return cc.metadata.shared


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", default="", help="device files to check, comma-separated stems (default: all)")
    ap.add_argument("--no-rule", action="store_true",
                    help="fp32 tiles as the device file gives them (the launcher before attempt 40), to see what the rule fixes")
    args = ap.parse_args(argv)
    widths = () if args.no_rule else TILE_WIDTHS
    tiles = {}
    for name in device_names([s for s in args.files.split(",") if s]):
        for tile in masked_tiles(kernel_config(name)):
            tiles.setdefault(tile, []).append(name)
    over = 0
    print(f"{'BLOCK_T x J x K, warps, stages':<32} {'bf16':>8} {'fp32':>8}  device files")
    for tile in sorted(tiles):
        sizes = [shared_bytes(tile, dtype, widths) for dtype in ("bf16", "fp32")]
        over += sum(s > SHARED_LIMIT for s in sizes)
        flag = "  OVER" if max(sizes) > SHARED_LIMIT else ""
        print(f"{'%d x %d x %d, %d, %d' % tile:<32} {sizes[0]:>8} {sizes[1]:>8}  {', '.join(sorted(set(tiles[tile])))}{flag}",
              flush=True)
    print(f"{len(tiles)} tiles; {over} over the {SHARED_LIMIT} B limit")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
