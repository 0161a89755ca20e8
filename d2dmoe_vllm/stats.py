"""Compute accounting: the fraction of expert compute the engine executed, per layer and overall.

The op adds to per-layer device counters; reading them is the only synchronising step and happens
only when a report is asked for (``compute_report``), at process exit (log line), or, when
``D2DMOE_STATS_FILE`` is set, every ``D2DMOE_STATS_INTERVAL`` seconds (default 10) in a background
thread of the serving process that rewrites that JSON file (a server's engine process may be killed
at shutdown, so the file must not wait for exit). On CUDA the thread copies the counters on a side
stream, so the serving stream never waits for it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import time
import weakref
from typing import Any

import torch
from torch import nn

from d2dmoe_vllm.expert_layer import DynamicKMLP

logger = logging.getLogger("d2dmoe_vllm")
STATS_FILE_ENV = "D2DMOE_STATS_FILE"
STATS_INTERVAL_ENV = "D2DMOE_STATS_INTERVAL"
STATS_AT_EXIT_ENV = "D2DMOE_STATS_AT_EXIT"  # "0": no report logged at exit (a caller that prints its own)


def expert_layers(model: nn.Module) -> list[DynamicKMLP]:
    return [m for m in model.modules() if isinstance(m, DynamicKMLP)]


def compute_report(model: nn.Module) -> dict[str, Any]:
    """Executed expert compute since the last reset, as fractions of running every expert.

    Under tensor parallelism this rank's counts cover its own experts; ``merge_reports`` adds the
    ranks' reports up."""
    mlps = expert_layers(model)
    counters = [m.counters for m in mlps]
    if counters and counters[0].is_cuda:
        side = torch.cuda.Stream(device=counters[0].device)
        with torch.cuda.stream(side):
            counters = [c.to("cpu", non_blocking=True) for c in counters]
        side.synchronize()
    layers = []
    for m, c in zip(mlps, counters):
        tokens, pairs = (int(v) for v in c.tolist()[:2])
        layers.append({"layer": m.layer, "module": m.module, "tokens": tokens, "executed_pairs": pairs,
                       "num_experts": m.num_experts, "expert_size": m.expert_size, "flops_per_pair": m.flops_per_pair})
    return _with_fractions(layers)


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from the tensor-parallel ranks' reports (each rank counts its own experts' pairs)."""
    layers = [dict(layer, executed_pairs=sum(r["layers"][i]["executed_pairs"] for r in reports))
              for i, layer in enumerate(reports[0]["layers"])]
    return _with_fractions(layers)


def _with_fractions(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """``overall_fraction`` over the FFN expert layers; with attention-projection experts also
    ``projection_fraction`` (over those) and ``expert_fraction`` (all expert layers, FLOP-weighted)."""
    done, full = {}, {}
    for r in layers:
        r["fraction"] = r["executed_pairs"] / (r["tokens"] * r["num_experts"]) if r["tokens"] else None
        kind = "mlp" if r["module"] == "mlp" else "projection"
        done[kind] = done.get(kind, 0) + r["executed_pairs"] * r["flops_per_pair"]
        full[kind] = full.get(kind, 0) + r["tokens"] * r["num_experts"] * r["flops_per_pair"]
    report = {"overall_fraction": done["mlp"] / full["mlp"] if full.get("mlp") else None, "layers": layers}
    if "projection" in full:
        report["projection_fraction"] = done["projection"] / full["projection"] if full["projection"] else None
        report["expert_fraction"] = sum(done.values()) / sum(full.values()) if sum(full.values()) else None
    return report


def stacked_layouts(model: nn.Module) -> list[bool]:
    """Per expert layer: whether its stacked weight layout survived loading (``DynamicKMLP.stacked``)."""
    return [m.stacked for m in expert_layers(model)]


def reset_counters(model: nn.Module) -> bool:
    for m in expert_layers(model):
        m.counters.zero_()
    return True


def engine_compute_report(llm: Any) -> dict[str, Any]:
    """Report of an offline ``vllm.LLM`` engine (all tensor-parallel workers merged)."""
    return merge_reports(llm.apply_model(compute_report))


def reset_engine_counters(llm: Any) -> None:
    """Zero the counters, e.g. after start-up so warm-up runs are not counted."""
    llm.apply_model(reset_counters)


def format_report(report: dict[str, Any]) -> str:
    if report["overall_fraction"] is None:
        return "D2DMoE: no tokens served"
    mlps = [r for r in report["layers"] if r["module"] == "mlp"]
    per_layer = " ".join(f"{r['fraction']:.2f}" for r in mlps if r["fraction"] is not None)
    tokens = mlps[0]["tokens"] if mlps else 0
    line = (f"D2DMoE executed {100 * report['overall_fraction']:.1f}% of expert compute over {tokens} tokens "
            f"(per layer: {per_layer})")
    if report.get("projection_fraction") is not None:
        line += f"; attention projections {100 * report['projection_fraction']:.1f}%"
    return line


def write_report(model: nn.Module, path: str) -> dict[str, Any]:
    report = compute_report(model)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)  # readers never see a half-written file
    return report


def start_reporting(model: nn.Module) -> None:
    """Log the report at process exit (unless $D2DMOE_STATS_AT_EXIT is "0"); keep $D2DMOE_STATS_FILE up
    to date while serving and write it a last time at exit."""
    ref = weakref.ref(model)
    path = os.environ.get(STATS_FILE_ENV)
    layers = expert_layers(model)
    if path and layers and layers[0].tp_size > 1:  # one file per rank: each counts its own experts
        path = f"{path}.rank{layers[0].tp_rank}"

    log = os.environ.get(STATS_AT_EXIT_ENV, "1") != "0"

    def at_exit() -> None:
        m = ref()
        if m is not None:
            report = write_report(m, path) if path else compute_report(m)  # the file's last write, always
            if log:
                logger.warning(format_report(report))

    if path or log:
        atexit.register(at_exit)
    if path:
        interval = float(os.environ.get(STATS_INTERVAL_ENV, "10"))

        def loop() -> None:
            while True:
                time.sleep(interval)
                m = ref()
                if m is None:
                    return
                write_report(m, path)
                del m

        threading.Thread(target=loop, name="d2dmoe-stats", daemon=True).start()
