"""Attempt 8 probe: router tail, in-kernel router, masked dense path and its fallback use, against
the committed paths, on the rows of the bar (bf16, independent routing, 30%). Variants are kernel
configs passed to the dispatcher; same timing method as bench_kernels.py. Writes probe.json."""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_kernels import (SHAPES, copies_for, dense_forward, graphed, make_dense, make_moe, reps_for,  # noqa: E402
                           routing_scores, time_us)

from d2dmoe_kernels.configs import kernel_config  # noqa: E402
from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402

BASE = kernel_config(torch.cuda.get_device_name())
OFF = dict(router=dict(tail_max_tokens=0), masked=dict(max_tokens=0, fallback_max_tokens=0))
MB = {  # masked block variants: BLOCK_T, BLOCK_J, BLOCK_K, num_warps, num_stages
    "A": (64, 64, 128, 4, 3), "B": (16, 32, 128, 4, 3), "C": (64, 32, 256, 4, 3), "E": (32, 64, 128, 4, 4),
    "F": (128, 64, 64, 8, 3),
}


def cfg(*overs):
    c = copy.deepcopy(BASE)
    for o in overs:
        for p, v in o.items():
            c[p] = {**c[p], **v}
    return c


def masked(v, own=False, lo=2, hi=4096):
    bt, bj, bk, w, s = MB[v]
    return dict(router=dict(tail_max_tokens=4096), fused=dict(max_tokens=1),
                masked=dict(min_tokens=lo, max_tokens=hi, own_router=own, BLOCK_T=bt, BLOCK_J=bj, BLOCK_K=bk,
                            num_warps=w, num_stages=s, fallback_max_tokens=0))


def variants(T):
    if T <= 4:
        v = {"cur": cfg(OFF), "tail": cfg(OFF, dict(router=dict(tail_max_tokens=4096))),
             "own": cfg(OFF, dict(fused=dict(own_router=True)))}
        if T == 4:
            v.update({f"masked{k}": cfg(masked(k)) for k in ("A", "B")})
            v["maskedB+own"] = cfg(masked("B", own=True))
        return v
    v = {"cur": cfg(OFF)}
    for k in (("B", "C", "E") if T <= 64 else ("A", "C", "E", "F")):
        v[f"masked{k}"] = cfg(masked(k))
    for k in (("B", "C") if T <= 64 else ("A", "C")):
        v[f"masked{k}+own"] = cfg(masked(k, own=True))
    return v


def fallback_variants(T):
    v = {"cur": cfg(OFF)}
    for k in (("B", "C", "E") if T <= 64 else ("A", "C", "F")):
        v[f"masked{k}"] = cfg(dict(masked=dict(zip(("BLOCK_T", "BLOCK_J", "BLOCK_K", "num_warps", "num_stages"), MB[k]),
                                               fallback_max_tokens=1 << 20)))
    return v


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    plan = [("gpt2-ffn", 128, (1, 4, 16, 64, 256), (1, 16, 64, 256, 1024)),
            ("gemma3-270m-ffn", 128, (1, 4, 16, 64, 256), (1, 16, 256)),
            ("gemma-2b-ffn", 256, (1, 4, 16, 64, 256, 1024), (1, 16, 64, 256, 1024))]
    for name, es, tokens, fb_tokens in plan:
        d, dff, gated, act, width, _ = SHAPES[name]
        n = copies_for((3 if gated else 2) * d * dff * 2)
        dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
        moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
        E = dff // es
        counters = torch.zeros(3, dtype=torch.int64, device="cuda")
        for T in sorted(set(tokens) | set(fb_tokens)):
            x = torch.randn(T, d, device="cuda", dtype=dtype)
            reps = reps_for(T)
            dense_us = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws], reps))
            jobs = []
            if T in tokens:
                routing, _ = routing_scores(T, E, 0.3, "independent", dtype)
                jobs += [("30%", k, c, routing, 0.99) for k, c in variants(T).items()]
                routing1, _ = routing_scores(T, E, 1.0, "independent", dtype)
                jobs += [("100%", k, c, routing1, 0.99) for k, c in variants(T).items() if k in ("cur", "maskedB",
                                                                                                  "maskedA", "own")]
            if T in fb_tokens:
                jobs += [("tau0", k, c, None, 0.0) for k, c in fallback_variants(T).items()]
            for kind, k, c, routing, tau in jobs:
                fn = [lambda w=w, c=c, routing=routing, tau=tau: dynamic_k_experts_triton(
                    x, w["router_in"], w["router_out"], tau, 0, w["w_in"], w["w_up"], w["w_out"], w["b_in"],
                    w["b_out"], act, counters, cfg=c, route_override=routing) for w in moe_ws]
                try:
                    us = time_us(graphed(fn, reps))
                except Exception as exc:  # keep probing the others
                    print(f"{name} T={T} {kind} {k}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                rows.append(dict(shape=name, expert_size=es, tokens=T, kind=kind, variant=k, dense_us=round(dense_us, 2),
                                 us=round(us, 2), speedup=round(dense_us / us, 3)))
                print(f"{name:16s} T={T:<5d} {kind:5s} {k:12s} dense {dense_us:8.1f} ours {us:8.1f} x{dense_us / us:.3f}",
                      flush=True)
            del x
        del dense_ws, moe_ws
        torch.cuda.empty_cache()
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "probe.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
