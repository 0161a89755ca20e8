"""Offline tuning of the kernels' launch configs for this device (no run-time autotuning).

    python benchmarks/tune_kernels.py --out DIR     # writes <device>.json for kernels/configs/

For each (hidden size, expert size) served and each path (fused T=1, decode T=16, grouped T=4096,
balanced T=1), times a small grid of configs on the expert op alone (CUDA graphs, weights rotated
beyond L2, 30% of experts, independent routing) and keeps the fastest. Prints what it tried.
A device without a file of its own starts from the file it borrows (``fallbacks.json``), so keys not
re-tuned keep that family's values. The balanced decode kernel replaces the fused one only where
it is measured faster (against the device's fused config, at T = 1 and at the fused path's largest
T); shapes whose router runs inside the fused kernel (small routers) keep the fused kernel.

``--paths gemm`` sets the cuBLAS-GEMM masked path's token range per shape instead: it times the
device's dispatch (gemm off) against the gemm path with each of GEMM_BLOCKS, at GEMM_TOKENS and the
three routings of GEMM_ROUTINGS, on every shape and expert size of bench_kernels.py, and keeps
``gemm_tier``'s choice (attempt 24's rule; the path never skips weights, so it wins only where every
expert runs anyway and Triton's tiles lose).
"""

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_kernels import SHAPES as BENCH_SHAPES  # noqa: E402
from bench_kernels import copies_for, make_moe, moe_us, reps_for, routing_scores  # noqa: E402

from d2dmoe_kernels.configs import config_file, kernel_config, own_file_name, path_config  # noqa: E402
from d2dmoe_kernels.layout import stacked_up_view  # noqa: E402

SHAPES = [(768, 3072, False, 64), (768, 3072, False, 128), (640, 2048, True, 64), (640, 2048, True, 128),
          (2048, 16384, True, 256), (2048, 16384, True, 512)]
GRID = {
    "fused": (1, [dict(BLOCK_J=j, BLOCK_K=k, num_warps=w, num_stages=s, BLOCK_N_REDUCE=r) for j, k, w, s, r in
                  itertools.product((16, 32, 64), (128, 256), (4, 8), (3,), (32, 64))]),
    "decode": (16, [dict(BLOCK_E=b, BLOCK_K=k, SPLIT=sp) for b, k, sp in
                    itertools.product((16, 32, 64), (128, 256), (4, 8, 16))]),
    "balanced": (1, [dict(programs_per_sm=p, BLOCK_J=j, BLOCK_K=k, BLOCK_N=256, num_warps=w, num_stages=s,
                          BLOCK_N_REDUCE=64) for p, j, k, w, s in
                     itertools.product((1, 2, 4), (16, 32), (128, 256), (4, 8), (3, 4))]),
    "grouped": (4096, [dict(BM=bm, BN_UP=bu, BN_DOWN=bd, num_warps=w, num_stages=s) for bm, (bu, bd), (w, s) in
                       itertools.product((64, 128), ((64, 128), (128, 128), (128, 256)), ((4, 3), (8, 3), (8, 4)))]),
}

GEMM_TOKENS = (64, 256, 1024, 4096, 16384)
GEMM_BLOCKS = (dict(BLOCK_T=64, BLOCK_C=128, num_warps=4), dict(BLOCK_T=32, BLOCK_C=256, num_warps=4))
GEMM_ROUTINGS = ((0.3, "independent"), (0.3, "shared"), (1.0, "independent"))
ALL_TOKENS = 1 << 30


def gemm_tier(times: dict, blocks=GEMM_BLOCKS) -> dict:
    """The gemm@dDeE config from measured layer times ``{T: {"device": {routing: us}, i: {routing: us}}}``
    (i indexes ``blocks``; routings "independent", "shared", "all" = 100% of experts).

    A candidate wins at T where its geometric-mean speed-up over the routings beats the dispatch by
    more than 2%, its slowest routing is faster than the dispatch's slowest, and it gives up at most 5%
    at 30% independent routing (the path cannot skip weights, so it must not trade away the sparsity a
    model was converted for). The path is on, with one candidate's blocks, over the longest run of
    consecutive T that candidate wins (of equal runs, the one with the larger gain: single marginal
    wins flip between runs), bounded at the geometric midpoints to the measured T outside the run;
    off (max_tokens 0) where no candidate wins anywhere."""
    tokens = sorted(times)
    best = None  # (len, summed log gain, -candidate), run, candidate
    for i in range(len(blocks)):
        run, gain_sum = [], 0.0
        for t in tokens + [None]:  # None closes the last run
            if t is not None:
                dev, mine = times[t]["device"], times[t][i]
                gain = math.exp(sum(math.log(dev[r] / mine[r]) for r in dev) / len(dev))
                if gain > 1.02 and max(mine.values()) < max(dev.values()) and \
                        mine["independent"] <= dev["independent"] / 0.95:
                    run, gain_sum = run + [t], gain_sum + math.log(gain)
                    continue
            if run and (best is None or (len(run), gain_sum, -i) > best[0]):
                best = ((len(run), gain_sum, -i), run, i)
            run, gain_sum = [], 0.0
    if best is None:
        return {"min_tokens": 1, "max_tokens": 0, **blocks[0]}
    _, run, i = best
    first, last = tokens.index(run[0]), tokens.index(run[-1])
    lo = run[0] if first == 0 else round(math.sqrt(tokens[first - 1] * run[0]))
    hi = ALL_TOKENS if last == len(tokens) - 1 else round(math.sqrt(run[-1] * tokens[last + 1]))
    return {"min_tokens": lo, "max_tokens": hi, **blocks[i]}


def tune_gemm(dev: dict, tuned: dict) -> None:
    """Times the dispatch against the gemm path (module docstring) and writes gemm@ keys into ``tuned``."""
    plain = {k: v for k, v in dev.items() if not k.startswith("gemm@")}  # shape keys would override "gemm"
    base = {**plain, "gemm": {**dev["gemm"], "max_tokens": 0}}
    cands = [{**plain, "gemm": {**dev["gemm"], **b, "min_tokens": 1, "max_tokens": ALL_TOKENS}} for b in GEMM_BLOCKS]
    for d, dff, gated, act, width, sizes in BENCH_SHAPES.values():
        n = copies_for((3 if gated else 2) * d * dff * 2)
        for es in sizes:
            ws = [make_moe(d, dff, gated, es, width, torch.bfloat16) for _ in range(n)]
            if stacked_up_view(ws[0]["w_in"], ws[0]["w_up"], ws[0]["router_in"]) is None:
                raise SystemExit("tune_gemm: bench_kernels.make_moe no longer gives the stacked layout the gemm "
                                 "path needs (layout.stack_up_weights): every candidate would time the dispatch")
            counters = torch.zeros(3, dtype=torch.int64, device="cuda")
            times = {}
            for T in GEMM_TOKENS:
                x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
                times[T] = {"device": {}, **{i: {} for i in range(len(cands))}}
                for fraction, routing in GEMM_ROUTINGS:
                    scores = routing_scores(T, dff // es, fraction, routing, torch.bfloat16)[0]
                    name = "all" if fraction == 1.0 else routing
                    for key, cfg in [("device", base), *enumerate(cands)]:
                        times[T][key][name] = moe_us(x, scores, ws, 0.99, act, counters, reps_for(T), cfg)
                print(f"  d={d} e={es} T={T} gemm: " + "; ".join(
                    f"{k} " + "/".join(f"{v:.1f}" for v in times[T][k].values()) for k in times[T]) + " us", flush=True)
            tuned[f"gemm@d{d}e{es}"] = gemm_tier(times)
            print(f"d={d} e={es} gemm: {tuned[f'gemm@d{d}e{es}']}", flush=True)
            del ws
            torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--paths", default=",".join(GRID), help="re-tune only these paths (others kept from the "
                    "device's file in kernels/configs/, or the file it borrows); 'gemm' (not in the default) "
                    "sets the cuBLAS-GEMM masked path's token ranges")
    args = ap.parse_args()

    device = torch.cuda.get_device_name()
    base, dev = kernel_config(None), kernel_config(device)
    start = config_file(device)
    tuned = json.loads(start.read_text()) if start is not None else {}
    tuned["_comment"] = (f"tuned by benchmarks/tune_kernels.py on {device} (paths {args.paths})"
                         + (f"; other keys from {start.name}" if start is not None and start.name != own_file_name(device)
                            else ""))
    names = args.paths.split(",")
    unknown = sorted(set(names) - set(GRID) - {"gemm"})
    if unknown:
        raise SystemExit(f"unknown --paths {unknown}: choose from {sorted(GRID) + ['gemm']}")
    paths = {p: GRID[p] for p in names if p != "gemm"}
    for (d, dff, gated, es), (path, (T, grid)) in itertools.product(SHAPES, paths.items()):
        fused = path_config(dev, "fused", d, es)
        if path == "balanced" and fused.get("own_router", False):
            print(f"d={d} e={es} balanced: skipped (the router's tail runs inside the fused kernel here)")
            continue
        n = copies_for((3 if gated else 2) * d * dff * 2)
        ws = [make_moe(d, dff, gated, es, 128, torch.bfloat16) for _ in range(n)]
        counters = torch.zeros(3, dtype=torch.int64, device="cuda")

        drawn = {}  # tokens -> (x, routing): every config of a shape sees the same inputs

        def time_at(cfg, tokens):
            if tokens not in drawn:
                drawn[tokens] = (torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16),
                                 routing_scores(tokens, dff // es, 0.3, "independent", torch.bfloat16)[0])
            x, routing = drawn[tokens]
            return moe_us(x, routing, ws, 0.99, "relu", counters, 8 if tokens <= 16 else 2, cfg)

        def with_cand(cand, upto=T):
            if path == "balanced":  # the device's config, the balanced kernel on for this shape up to ``upto``
                return {**dev, f"balanced@d{d}e{es}": {**cand, "max_tokens": upto}}
            cfg = {p: dict(v) for p, v in base.items()}
            cfg["fused"]["max_tokens"] = T if path == "fused" else 0
            cfg["decode"]["max_tokens"] = T if path == "decode" else 0
            cfg[path].update(cand)
            return cfg

        best = None
        for cand in grid:
            try:
                us = time_at(with_cand(cand), T)
            except Exception as err:  # a config the compiler rejects (e.g. out of shared memory)
                print(f"  d={d} e={es} {path} {cand}: failed ({type(err).__name__})")
                continue
            print(f"  d={d} e={es} {path} {cand}: {us:.1f} us", flush=True)
            if best is None or us < best[0]:
                best = (us, cand)
        if path == "balanced":  # on where it beats the fused kernel, at T = 1 and at the fused path's largest T
            top = fused["max_tokens"]
            fused_us = {t: time_at(dev, t) for t in sorted({1, top})}
            mine = {t: best[0] if t == T else time_at(with_cand(best[1], t), t) for t in fused_us}
            on = [t for t in sorted(fused_us) if mine[t] < fused_us[t]]
            limit = top if on and on[-1] == top and 1 in on else (1 if 1 in on else 0)
            print(f"d={d} e={es} balanced vs fused: " + ", ".join(
                f"T={t} {mine[t]:.1f} vs {fused_us[t]:.1f} us" for t in fused_us) + f" -> max_tokens {limit}")
            tuned[f"balanced@d{d}e{es}"] = {**best[1], "max_tokens": limit}
        else:
            tuned[f"{path}@d{d}e{es}"] = best[1]
        print(f"d={d} e={es} {path}: best {best[1]} {best[0]:.1f} us", flush=True)
        del ws
        torch.cuda.empty_cache()
    if "gemm" in names:  # last: against the dispatch with the paths tuned above
        # the config the written file will give (kernel_config: each key over the defaults' same key)
        tune_gemm({**dev, **{k: {**base.get(k, {}), **v} for k, v in tuned.items() if not k.startswith("_")}}, tuned)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / own_file_name(device)
    path.write_text(json.dumps(tuned, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
