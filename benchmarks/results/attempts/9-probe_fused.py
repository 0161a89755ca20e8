"""Attempt 9 probe: where the T=1 layer's time goes (router GEMM + tail, fused kernel, reduction)
and fused-kernel launch configs, at Gemma-2B (e=256, 512) and GPT-2 / Gemma 3 270M (e=128) size,
30% of experts, independent routing. Same timing method as bench_kernels.py. Writes probe_fused.json."""

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench_kernels import (SHAPES, copies_for, dense_forward, graphed, make_dense, make_moe,  # noqa: E402
                           routing_scores, time_us)

from d2dmoe_kernels.configs import kernel_config, path_config  # noqa: E402
from d2dmoe_kernels.dispatch import dynamic_k_experts_triton  # noqa: E402
from d2dmoe_kernels.expert_decode_fused import fused_decode_experts  # noqa: E402
from d2dmoe_kernels.router_tail import router_hidden, router_tail  # noqa: E402

BASE = kernel_config(torch.cuda.get_device_name())
KEYS = ("BLOCK_J", "BLOCK_K", "num_warps", "num_stages", "BLOCK_N_REDUCE", "BLOCK_N")
VARIANTS = [(64, 256, 4, 3, 32, 128), (32, 256, 4, 2, 32, 128), (32, 128, 4, 4, 32, 128), (64, 256, 4, 2, 32, 128),
            (128, 128, 8, 3, 32, 128), (128, 256, 8, 2, 32, 128), (64, 512, 8, 2, 32, 128), (64, 256, 4, 3, 32, 64),
            (64, 256, 4, 3, 32, 256), (64, 256, 4, 3, 16, 128), (16, 256, 4, 3, 32, 128), (32, 256, 4, 3, 32, 128)]


def main(out):
    torch.manual_seed(0)
    dtype = torch.bfloat16
    rows = []
    for name, es in (("gemma-2b-ffn", 256), ("gemma-2b-ffn", 512), ("gpt2-ffn", 128), ("gemma3-270m-ffn", 128)):
        d, dff, gated, act, width, _ = SHAPES[name]
        n = copies_for((3 if gated else 2) * d * dff * 2)
        dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
        moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
        E = dff // es
        counters = torch.zeros(3, dtype=torch.int64, device="cuda")
        x = torch.randn(1, d, device="cuda", dtype=dtype)
        routing, _ = routing_scores(1, E, 0.3, "independent", dtype)
        scores, ref, tau = routing

        def t(label, fns, **extra):
            try:
                us = time_us(graphed(fns, 32))
            except Exception as exc:
                print(f"{name} e={es} {label}: FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
                return
            rows.append(dict(shape=name, expert_size=es, what=label, us=round(us, 2), **extra))
            print(f"{name:16s} e={es:<4d} {label:50s} {us:8.2f} us", flush=True)

        t("dense", [lambda w=w: dense_forward(x, w, gated, act) for w in dense_ws])
        t("layer (device config)", [lambda w=w: dynamic_k_experts_triton(
            x, w["router_in"], w["router_out"], tau, 0, w["w_in"], w["w_up"], w["w_out"], w["b_in"], w["b_out"], act,
            counters, route_override=routing) for w in moe_ws])
        rcfg = BASE["router"]
        t("router GEMM only", [lambda w=w: router_hidden(x, w["router_in"]) for w in moe_ws])
        t("router GEMM + tail", [lambda w=w: router_tail(router_hidden(x, w["router_in"]), w["router_out"], rcfg)
                                 for w in moe_ws])
        fcfg = path_config(BASE, "fused", d, es)
        for v in VARIANTS:
            c = {**fcfg, **dict(zip(KEYS, v))}
            label = "fused+reduce " + ",".join(map(str, v))
            t(label, [lambda w=w, c=c: fused_decode_experts(x, scores, ref, tau, w["w_in"], w["w_up"], w["w_out"],
                                                            w["b_in"], w["b_out"], act, counters, c) for w in moe_ws],
              cfg=dict(zip(KEYS, v)))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "probe_fused.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
