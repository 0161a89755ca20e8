"""Probe (next lease, STEP=condprobe): can the expert layer choose its path on the device, inside a CUDA graph?

Attempt 43 (docs/kernels.md) found that one token range per shape cannot serve both ends: where few experts run,
the Triton paths (masked / grouped) skip weights and win; where most run, the gemm path (cuBLAS over every expert,
then select) wins by up to 2.5x (Gemma-2B e=128 T=4096 at 100%: grouped 4102 us, gemm 1622 us). The host knows T,
not the executed fraction, so the choice would have to be made on the device: CUDA graph conditional (IF) nodes,
which torch exposes as ``CUDAGraph.get_currently_capturing_graph().begin_capture_to_if_node(pred)`` (the
mechanism behind ``torch.cond`` under graph capture). This probe answers, on the lent GPU:

1. does the device's torch have that API (torch 2.11 on the payload; 2.13 here has it)?
2. is it correct: one graph holding both paths under IF / IF-NOT nodes on a device predicate, replayed with the
   predicate flipped between replays, gives each path's output bit for bit?
3. what does it cost: the dispatch's ``choice`` path (kernels/dispatch.py: the router, the predicate from the
   selection, two IF nodes, both paths captured) against each path alone, at 10% / 30% / 100% of experts,
   independent and shared.

Prediction (written before it runs): the API is there (torch 2.13 has it; if the payload's 2.11 does not,
the probe says so and stops); outputs match exactly (the same kernels run); the choice costs ~5-20 us over the
better path (the router run before the choice, the predicate over T x E scores, the output copy, the IF nodes),
so at Gemma-2B T >= 1024 it lands within ~2% of the better path in every row, which turns Gemma-2B e=128 T=4096 at 100% from 0.38x into ~0.9x of dense and
leaves the rows where both paths lose to dense (GPT-2 at T >= 16: the best of both files still leaves 159-165 rows
below 0.95x, attempts/52-lease) where they are.

Each timed graph also records its capture's peak memory above the inputs (MiB): both branches of every call are
captured on their own streams, so a graph of many calls may hold more than one path's temporaries per call.
The d640 / d768 rows' "skip" is the host rule (the masked kernel with the router tail inside), the choice's skip
branch the masked kernel on the router's scores: there the cost over the better path includes that difference.

Timing as bench_kernels.py: graphs of back-to-back layer calls over rotated weight copies, do_bench medians.
Writes OUT/probe-conditional.json and prints the table.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_kernels import (SHAPES, copies_for, dense_forward, graphed, make_dense, make_moe, moe_forward,  # noqa: E402
                           reps_for, routing_scores, time_us)
from d2dmoe_kernels.configs import kernel_config  # noqa: E402
from d2dmoe_kernels.dispatch import conditional_nodes, device_chosen_experts  # noqa: E402
from provenance import provenance  # noqa: E402

CASES = [("gemma-2b-ffn", 128, 4096), ("gemma-2b-ffn", 256, 4096), ("gemma-2b-ffn", 128, 1024),
         ("gpt2-ffn", 128, 16384), ("gemma3-270m-ffn", 64, 4096)]
ROUTINGS = [(0.1, "independent"), (0.1, "shared"), (0.3, "independent"), (1.0, "independent")]
THRESHOLD = 0.4   # executed fraction above which the conditional runs the gemm path (the probe's guess)
TAU = 0.99        # bench_kernels' routing: chosen experts score in [0.995, 1], the rest below 0.9


def has_api() -> dict:
    graph = torch.cuda.CUDAGraph
    return {**{name: hasattr(graph, name) for name in
               ("get_currently_capturing_graph", "begin_capture_to_if_node", "end_capture_to_conditional_node")},
            "dispatch_conditional_nodes": conditional_nodes()}


def with_gemm(cfg: dict, d: int, es: int, on: bool) -> dict:
    """``cfg`` with the gemm path forced on at every T (the tuner's first blocks) or off, for this shape."""
    keys = {"min_tokens": 1, "max_tokens": (1 << 30) if on else 0, "BLOCK_T": 64, "BLOCK_C": 128, "num_warps": 4,
            "by_tokens": []}
    return {**cfg, f"gemm@d{d}e{es}": keys}


def with_choice(cfg: dict, d: int, es: int) -> dict:
    """``cfg`` (gemm blocks set) with the dispatch's path chosen on the device for this shape at every T."""
    return {**cfg, "choice": {"min_tokens": 1, "max_tokens": 0, "fraction": THRESHOLD},
            f"choice@d{d}e{es}": {"min_tokens": 1, "max_tokens": 1 << 30}}


def check_flip(x, routing, w, activation, counters, cfg_gemm, cfg_skip, E) -> dict:
    """One graph with both paths; the predicate's tensor is overwritten between replays (the routing is not):
    each replay must equal the path the predicate names, computed eagerly."""
    want = {True: moe_forward(x, routing, w, TAU, activation, counters, cfg_gemm).clone(),
            False: moe_forward(x, routing, w, TAU, activation, counters, cfg_skip).clone()}
    flag = torch.zeros((), dtype=torch.bool, device="cuda")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = device_chosen_experts(torch.cuda.CUDAGraph.get_currently_capturing_graph(), flag,
                                    lambda: moe_forward(x, routing, w, TAU, activation, counters, cfg_gemm),
                                    lambda: moe_forward(x, routing, w, TAU, activation, counters, cfg_skip),
                                    x.shape, x)
    result = {}
    for value in (True, False, True):
        flag.fill_(value)
        g.replay()
        torch.cuda.synchronize()
        result[f"pred={value}"] = bool(torch.equal(out, want[value]))
    result["paths_differ"] = not torch.equal(want[True], want[False])  # bf16 paths sum in other orders
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {**provenance(), "threshold": THRESHOLD, "api": has_api(), "checks": {}, "rows": []}
    path = args.out / "probe-conditional.json"
    print(f"torch {torch.__version__} cuda {torch.version.cuda} api {doc['api']}", flush=True)
    if not all(doc["api"].values()):
        path.write_text(json.dumps(doc, indent=1))
        print("no conditional-node API in this torch: stop", flush=True)
        return
    dtype, base = torch.bfloat16, kernel_config(torch.cuda.get_device_name())
    torch.manual_seed(0)
    for name, es, T in CASES:
        d, dff, gated, activation, width, _ = SHAPES[name]
        E = dff // es
        n = copies_for((3 if gated else 2) * d * dff * 2)
        x = torch.randn(T, d, device="cuda", dtype=dtype)
        reps = reps_for(T)
        dense_ws = [make_dense(d, dff, gated, dtype) for _ in range(n)]
        dense_us = time_us(graphed([lambda w=w: dense_forward(x, w, gated, activation) for w in dense_ws], reps))
        del dense_ws
        moe_ws = [make_moe(d, dff, gated, es, width, dtype) for _ in range(n)]
        counters = torch.zeros(3, dtype=torch.int64, device="cuda")
        cfg_gemm, cfg_skip = with_gemm(base, d, es, True), with_gemm(base, d, es, False)
        cfg_choice = with_choice(cfg_gemm, d, es)
        key = f"{name} e={es} T={T}"
        routing, _ = routing_scores(T, E, 0.3, "independent", dtype)
        try:
            doc["checks"][key] = check_flip(x, routing, moe_ws[0], activation, counters, cfg_gemm, cfg_skip, E)
        except Exception as exc:  # noqa: BLE001 -- the probe records why and moves on
            doc["checks"][key] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        print(f"{key}: replay with the predicate flipped {doc['checks'][key]}", flush=True)
        if "error" in doc["checks"][key]:
            path.write_text(json.dumps(doc, indent=1))
            continue
        for fraction, kind in ROUTINGS:
            routing, real = routing_scores(T, E, fraction, kind, dtype)
            times, peaks = {}, {}
            for label, fn in (("gemm", lambda w: moe_forward(x, routing, w, TAU, activation, counters, cfg_gemm)),
                              ("skip", lambda w: moe_forward(x, routing, w, TAU, activation, counters, cfg_skip)),
                              ("conditional", lambda w: moe_forward(x, routing, w, TAU, activation, counters,
                                                                    cfg_choice))):
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                graph = graphed([lambda w=w, fn=fn: fn(w) for w in moe_ws], reps)
                peaks[label] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)  # MiB above the inputs
                times[label] = time_us(graph)
                del graph
            best = min(times["gemm"], times["skip"])
            row = dict(shape=name, expert_size=es, tokens=T, fraction=round(real, 4), routing=kind,
                       dense_us=round(dense_us, 2), **{f"{k}_us": round(v, 2) for k, v in times.items()},
                       conditional_over_best_us=round(times["conditional"] - best, 2),
                       graph_peak_mib={k: v for k, v in peaks.items()},
                       speedup_conditional=round(dense_us / times["conditional"], 3),
                       speedup_best=round(dense_us / best, 3))
            doc["rows"].append(row)
            print(f"{key} f={real:.3f} {kind:11s} dense {dense_us:8.1f}  gemm {times['gemm']:8.1f}  skip "
                  f"{times['skip']:8.1f}  conditional {times['conditional']:8.1f} us (+{row['conditional_over_best_us']} "
                  f"over the better; x{row['speedup_conditional']:.2f} of dense)", flush=True)
        path.write_text(json.dumps(doc, indent=1))  # after each case: a cut-off run keeps its rows
        del moe_ws
        torch.cuda.empty_cache()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
