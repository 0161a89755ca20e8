"""Attempt 10 probe: (a) fused T=1 launch configs and the split router tail at Gemma-2B size;
(b) the masked path against the grouped one at large T for the small shapes; (c) the dense
fallback (masked kernel, experts viewed as one) against cuBLAS at large T. Writes probe_large.json."""

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
BLK = ("BLOCK_T", "BLOCK_J", "BLOCK_K", "num_warps", "num_stages")
A, F, G = (64, 64, 128, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3)
FK = ("BLOCK_J", "BLOCK_K", "num_warps", "num_stages", "BLOCK_N")


def cfg(over):
    c = copy.deepcopy(BASE)
    for p, v in over.items():
        c[p] = {**c.get(p, {}), **v}
    return c


def masked(d, blk, hi=1 << 30):
    return {f"masked@d{d}": dict(max_tokens=hi, fallback_max_tokens=0, by_tokens=[], **dict(zip(BLK, blk)))}


def fallback(d, blk):
    return {f"masked@d{d}": dict(fallback_max_tokens=1 << 30, by_tokens=[], **dict(zip(BLK, blk)))}


def plan():
    jobs = []
    for es in (256, 512):
        key = f"fused@d2048e{es}"
        for split in (False, True):
            for v in ((64, 256, 4, 3, 128), (64, 256, 4, 3, 256), (64, 256, 4, 3, 512), (64, 512, 4, 2, 256),
                      (128, 256, 8, 2, 256), (64, 256, 8, 3, 256), (64, 128, 4, 4, 256)) if not split else \
                     ((64, 256, 4, 3, 128), (64, 256, 4, 3, 256)):
                jobs.append(("gemma-2b-ffn", es, 1, "30%", f"fused {v} split={split}",
                             cfg({key: dict(zip(FK, v), split_tail=split)})))
    for name, d in (("gpt2-ffn", 768), ("gemma3-270m-ffn", 640)):
        for es in (32, 64, 128):
            for T in (1024, 4096, 16384):
                jobs.append((name, es, T, "30%", "cur", cfg({})))
                for label, blk in (("A", A), ("F", F), ("G", G)):
                    jobs.append((name, es, T, "30%", f"masked{label}", cfg(masked(d, blk))))
    for name, d in (("gpt2-ffn", 768), ("gemma3-270m-ffn", 640), ("gemma-2b-ffn", 2048)):
        for T in (1024, 4096, 16384) if d != 2048 else (1024, 4096):
            es = 32 if d != 2048 else 128
            jobs.append((name, es, T, "tau0", "cur", cfg({})))
            for label, blk in (("F", F), ("G", G)):
                jobs.append((name, es, T, "tau0", f"masked{label}", cfg(fallback(d, blk))))
    return jobs


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    jobs = plan()
    cache = {}
    for name, es, T, kind, label, c in jobs:
        d, dff, gated, act, width, _ = SHAPES[name]
        n = copies_for((3 if gated else 2) * d * dff * 2)
        if cache.get("key") != (name, es):
            cache.clear()
            torch.cuda.empty_cache()
            cache.update(key=(name, es), moe=[make_moe(d, dff, gated, es, width, dtype) for _ in range(n)],
                         dense=[make_dense(d, dff, gated, dtype) for _ in range(n)])
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        reps = reps_for(T)
        dkey = ("dense_us", name, T)
        if dkey not in cache:
            cache[dkey] = time_us(graphed([lambda w=w: dense_forward(x, w, gated, act) for w in cache["dense"]], reps))
        dense_us = cache[dkey]
        routing = routing_scores(T, dff // es, 0.3, "independent", dtype)[0] if kind == "30%" else None
        tau = 0.99 if kind == "30%" else 0.0
        counters = torch.zeros(3, dtype=torch.int64, device="cuda")
        fns = [lambda w=w: dynamic_k_experts_triton(x, w["router_in"], w["router_out"], tau, 0, w["w_in"], w["w_up"],
                                                    w["w_out"], w["b_in"], w["b_out"], act, counters, cfg=c,
                                                    route_override=routing) for w in cache["moe"]]
        try:
            us = time_us(graphed(fns, reps))
        except Exception as exc:
            print(f"{name} e={es} T={T} {kind} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        rows.append(dict(shape=name, expert_size=es, tokens=T, kind=kind, variant=label, dense_us=round(dense_us, 2),
                         us=round(us, 2), speedup=round(dense_us / us, 3)))
        print(f"{name:16s} e={es:<4d} T={T:<6d} {kind:5s} {label:42s} dense {dense_us:8.1f} ours {us:8.1f} "
              f"x{dense_us / us:.3f}", flush=True)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "probe_large.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
