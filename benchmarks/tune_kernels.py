"""Offline tuning of the kernels' launch configs for this device (no run-time autotuning).

    python benchmarks/tune_kernels.py --out DIR     # writes <device>.json for kernels/configs/

For each (hidden size, expert size) served and each path (fused T=1, decode T=16, grouped T=4096,
balanced T=1), times a small grid of configs on the expert op alone (CUDA graphs, weights rotated
beyond L2, 30% of experts, independent routing) and keeps the fastest; the values the device runs
there now are timed too (``candidates``), so a re-tune keeps them unless a grid point wins. Prints
what it tried. Candidates are timed inside the device's config, with only the path under test
reachable at its T (``taking_path``: the device may send T=16 to the masked path, where the decode
path is tuned), and written where they act at that T (``candidate_key``: into the ``by_tokens`` tier
that covers T, if any), so the shape's other tiers and the keys the grid does not vary (``TMA``,
``split_tail``, ``own_router``, ...) stay as the device has them. A device without a file of its own
starts from the file it borrows (``fallbacks.json``), so keys not re-tuned keep that family's values.
The balanced decode kernel replaces the fused one only where it is measured faster (against the
device's fused config, at T = 1 and at the fused path's largest T); shapes whose router runs inside
the fused kernel (small routers) keep the fused kernel.

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

from d2dmoe_kernels.configs import (config_file, kernel_config, own_file_name, path_config,  # noqa: E402
                                    token_tier, with_overrides)
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
KEEP_MARGIN = 0.98  # a candidate replaces the device's values only if it is more than 2% faster
TIERED = ("fused", "masked", "gemm")  # the paths whose configs dispatch reads through token_tier
# what must be off at T for dispatch to reach a path (its order: gemm, persistent, fused [balanced inside
# fused's range], masked, decode, grouped), and what the path itself needs on up to T
OFF_BEFORE = {"fused": ("gemm", "persistent", "balanced"), "balanced": ("gemm", "persistent"),
              "decode": ("gemm", "persistent", "fused", "masked"),
              "grouped": ("gemm", "persistent", "fused", "masked", "decode")}
ON_FOR = {"fused": ("fused",), "balanced": ("fused", "balanced"), "decode": ("decode",), "grouped": ()}


def candidate_key(cfg: dict, path: str, d: int, es: int, tokens: int, values: dict) -> dict:
    """The shape key ``path@dDeE`` of ``cfg`` with ``values`` where they act at ``tokens``: in the first
    ``by_tokens`` tier that covers it (a tier overrides the key's own values there), else in the key
    itself. The other tiers and keys stay as they were."""
    key = dict(cfg.get(f"{path}@d{d}e{es}", {}))
    tiers = path_config(cfg, path, d, es).get("by_tokens", []) if path in TIERED else []
    at = next((i for i, (bound, _) in enumerate(tiers) if tokens <= bound), None)
    if at is None:
        return {**key, **values}
    key["by_tokens"] = [[bound, {**over, **values} if i == at else dict(over)] for i, (bound, over) in enumerate(tiers)]
    return key


def acting_values(cfg: dict, path: str, d: int, es: int, tokens: int) -> dict:
    """The values ``path`` runs with at ``tokens`` for this shape, as dispatch reads them (its token tier
    applied where dispatch applies one; the tier list itself left out)."""
    out = path_config(cfg, path, d, es)
    out = token_tier(out, tokens) if path in TIERED else dict(out)
    out.pop("by_tokens", None)
    return out


def taking_path(cfg: dict, path: str, d: int, es: int, tokens: int) -> dict:
    """``cfg`` with the paths dispatch tries before ``path`` off at this shape and ``tokens``, and
    ``path`` on there, so a layer timed at ``tokens`` runs ``path`` (``cfg`` is not changed)."""
    out = dict(cfg)
    for p, limit in [(p, 0) for p in OFF_BEFORE[path]] + [(p, tokens) for p in ON_FOR[path]]:
        if p in out:  # older configs have no gemm path
            out[f"{p}@d{d}e{es}"] = candidate_key(out, p, d, es, tokens, {"max_tokens": limit})
    return out


def candidate_config(cfg: dict, path: str, d: int, es: int, tokens: int, cand: dict, upto: int | None = None) -> dict:
    """What a candidate is timed in: ``cfg`` with ``cand`` for this shape where it acts at ``tokens``
    (the path's tuning T), and ``path`` taken at ``upto`` tokens (default ``tokens``)."""
    shaped = {**cfg, f"{path}@d{d}e{es}": candidate_key(cfg, path, d, es, tokens, cand)}
    return taking_path(shaped, path, d, es, tokens if upto is None else upto)


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


def candidates(cfg: dict, path: str, d: int, es: int) -> list:
    """The grid of ``path`` led by the values ``cfg`` runs at the path's tuning T (timed even where the
    grid lacks them, e.g. a probe's choice), each point once."""
    tokens, grid = GRID[path]
    acting = acting_values(cfg, path, d, es, tokens)
    current = {k: acting[k] for k in grid[0] if k in acting}
    if current.keys() != grid[0].keys():  # a config without one of the grid's knobs: the grid alone
        return grid
    return [current, *(c for c in grid if c != current)]


def pick(timed: list, current: dict) -> tuple:
    """The (us, candidate) to keep of ``timed``: the fastest, unless it beats the device's ``current``
    values by less than KEEP_MARGIN (run-to-run spread), so a re-tune changes only what it measures."""
    best = min(timed, key=lambda t: t[0])
    now = next((t for t in timed if t[1] == current), None)
    return now if now is not None and best[0] > now[0] * KEEP_MARGIN else best


def tuned_shapes(text: str) -> list:
    """The SHAPES rows named by ``--shapes`` ("D:E,D:E"; empty: all of them)."""
    if not text:
        return SHAPES
    known = {f"{d}:{es}": row for row in SHAPES for d, _, _, es in [row]}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown --shapes {unknown}: choose from {sorted(known)}")
    return [known[n] for n in names]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--paths", default=",".join(GRID), help="re-tune only these paths (others kept from the "
                    "device's file in kernels/configs/, or the file it borrows); 'gemm' (not in the default) "
                    "sets the cuBLAS-GEMM masked path's token ranges")
    ap.add_argument("--shapes", default="", help="re-tune only these shapes, as D:E (hidden size : expert "
                    "size) pairs, e.g. 768:64,640:128 (default: every shape of SHAPES)")
    args = ap.parse_args()
    shapes = tuned_shapes(args.shapes)

    device = torch.cuda.get_device_name()
    base, dev = kernel_config(None), kernel_config(device)
    start = config_file(device)
    tuned = json.loads(start.read_text()) if start is not None else {}
    before = tuned.get("_comment")
    tuned["_comment"] = (f"tuned by benchmarks/tune_kernels.py on {device} (paths {args.paths}"
                         + (f", shapes {args.shapes}" if args.shapes else "") + ")"
                         + (f"; other keys from {start.name}" if start is not None and start.name != own_file_name(device)
                            else "") + (f"; before this run: {before}" if before else ""))
    names = args.paths.split(",")
    unknown = sorted(set(names) - set(GRID) - {"gemm"})
    if unknown:
        raise SystemExit(f"unknown --paths {unknown}: choose from {sorted(GRID) + ['gemm']}")
    paths = {p: GRID[p] for p in names if p != "gemm"}
    for (d, dff, gated, es), (path, (T, _)) in itertools.product(shapes, paths.items()):
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

        key = f"{path}@d{d}e{es}"
        timed, cands = [], candidates(dev, path, d, es)
        for cand in cands:
            try:
                us = time_at(candidate_config(dev, path, d, es, T, cand), T)
            except Exception as err:  # a config the compiler rejects (e.g. out of shared memory)
                print(f"  d={d} e={es} {path} {cand}: failed ({type(err).__name__})")
                continue
            print(f"  d={d} e={es} {path} {cand}: {us:.1f} us" + (" (device)" if cand == cands[0] else ""), flush=True)
            timed.append((us, cand))
        if not timed:  # every candidate failed: the device's key stays as it is
            print(f"d={d} e={es} {path}: no candidate ran, {key} kept", flush=True)
            del ws
            continue
        best = pick(timed, cands[0])
        if path == "balanced":  # on where it beats the fused kernel, at T = 1 and at the fused path's largest T
            top = fused["max_tokens"]
            fused_us = {t: time_at(taking_path(dev, "fused", d, es, t), t) for t in sorted({1, top})}
            mine = {t: best[0] if t == T else time_at(candidate_config(dev, path, d, es, T, best[1], t), t) for t in fused_us}
            on = [t for t in sorted(fused_us) if mine[t] < fused_us[t]]
            limit = top if on and on[-1] == top and 1 in on else (1 if 1 in on else 0)
            print(f"d={d} e={es} balanced vs fused: " + ", ".join(
                f"T={t} {mine[t]:.1f} vs {fused_us[t]:.1f} us" for t in fused_us) + f" -> max_tokens {limit}")
            tuned[key] = candidate_key(dev, path, d, es, T, {**best[1], "max_tokens": limit})
        else:
            tuned[key] = candidate_key(dev, path, d, es, T, best[1])
        print(f"d={d} e={es} {path}: best {best[1]} {best[0]:.1f} us", flush=True)
        del ws
        torch.cuda.empty_cache()
    if "gemm" in names:  # last: against the dispatch with the paths tuned above
        # the config the written file will give (kernel_config: each key over the defaults' same key)
        tune_gemm(with_overrides(base, {k: v for k, v in tuned.items() if not k.startswith("_")}), tuned)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / own_file_name(device)
    path.write_text(json.dumps(tuned, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
