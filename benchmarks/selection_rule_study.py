"""Which per-token reference should tau be a fraction of? A study before the converter and kernels grow one.

    python benchmarks/selection_rule_study.py CHECKPOINT --out benchmarks/results   # ~35 min on 2 CPU cores

D2DMoE runs expert e for a token iff its predicted output norm R_e >= tau * max_e R_e (the paper's rule). Gemma
normalises each token's FFN output (post-FFN RMSNorm), so what a token loses is the dropped experts' output
relative to its whole output, and the largest expert's norm is a rough stand-in for that: a token whose output
is spread over many experts keeps many small ones under the max rule. The rules compared, each with the arg-max
expert always run (so tau = 1 still runs one expert per token) and tau bisected on the converter's calibration
tokens to the same FFN budget:

- ``max``: R_e >= tau * max_e R_e (the paper's; every kernel computes this reference);
- ``l2``: R_e >= tau * ||R||_2 (the whole output's norm if the experts' outputs were orthogonal);
- ``sum``: R_e >= tau * sum_e R_e (a bound on the whole output's norm; the same as a mean, tau scaled by E);
- ``cum``: drop the smallest experts while their summed R_e^2 stays < tau^2 * sum_e R_e^2 (needs a sort per
  token: the rule the others approximate).

``max``, ``l2`` and ``sum`` are a row reduction each, as cheap in a kernel as the max is. Scored by held-out
perplexity on the converter's own held-out tokens (its 2,048 calibration tokens skipped, the next 4,096), with
the routers' scores, and with ``--oracle-budgets`` on every expert's true output norm too (no router error).
Writes ``selection-rule-study-<name>.json`` + ``.png`` under ``--out``. The committed run (session 61): the
README's main job converted at 50% (``d2dmoe-convert GGUF /tmp/s61/b50 --budget 0.5 --dtype bfloat16 --router-steps 500``; 500 was the default then), then
``--budgets 0.3,0.5,0.75 --oracle-budgets 0.5 --name gemma3-270m-cpu-default``.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import d2dmoe_converter.moe_model as moe_model
from checkpoint_study import load_study, plot_perplexity_vs_compute
from d2dmoe_converter.calibrate import CalibrateOptions, bisect_within
from d2dmoe_converter.moe_model import ffn_fraction, perplexity, run_base, set_selection
from d2dmoe_kernels.reference import select_experts
from provenance import provenance

RULES = ("max", "l2", "sum", "cum")


def select_by(rule: str, scores: torch.Tensor, tau: float) -> torch.Tensor:
    """[T, E] bool: the experts each token runs under ``rule`` (module docstring); the arg-max always runs."""
    if rule in ("max", "sum"):   # the rules the converter and kernels run (``selection_rule``)
        return select_experts(scores, tau, reference=rule)
    s = scores.float()
    top = s >= s.amax(-1, keepdim=True)
    if rule == "cum":
        q = s.pow(2)
        small, idx = q.sort(-1)                                       # ascending: the smallest are dropped first
        drop = small.cumsum(-1) < tau**2 * q.sum(-1, keepdim=True)   # strict: tau = 0 drops nothing, not the zeros
        return torch.ones_like(top).scatter(-1, idx, ~drop) | top
    return (s >= tau * s.norm(dim=-1, keepdim=True)) | top   # l2


@contextmanager
def rule_in(rule: str):
    """The reference model's expert layers select by ``rule`` inside (dynamic-k only)."""
    real = moe_model.select_experts
    moe_model.select_experts = lambda scores, tau, top_k=0, reference="max": select_by(rule, scores, tau)
    try:
        yield
    finally:
        moe_model.select_experts = real


def fraction_at(model, seqs: torch.Tensor, tau: float, oracle: bool) -> float:
    set_selection(model, tau, oracle=oracle)
    with torch.no_grad():
        run_base(model, seqs)
    return ffn_fraction(model)


def point(model, calib, test, rule: str, budget: float, oracle: bool, iterations: int) -> dict:
    with rule_in(rule):
        f_one = fraction_at(model, calib, 1.0, oracle)
        tau, f_cal, _ = (1.0, f_one, None) if f_one > budget else bisect_within(
            lambda t: fraction_at(model, calib, t, oracle), 0.0, 1.0, budget, iterations,
            f"{rule}{' (oracle)' if oracle else ''}: tau for {budget:.0%}", f_hi=f_one)
        set_selection(model, tau, oracle=oracle)
        ppl = perplexity(model, test, desc=f"{rule}: perplexity")
        return {"rule": rule, "oracle": oracle, "budget": budget, "tau": tau, "calib_fraction": f_cal,
                "ffn_fraction": ffn_fraction(model), "ppl": ppl}


def plot(result: dict, path: Path) -> None:
    curves = []
    for rule, marker in zip(RULES, "os^v"):
        for oracle in (False, True):
            pts = [(p["ffn_fraction"], p["ppl"]) for p in result["points"] if p["rule"] == rule and p["oracle"] == oracle]
            if pts:
                curves.append((f"{rule}{' (oracle)' if oracle else ''}", pts,
                               {"marker": marker, "ls": ":" if oracle else "-", "color": f"C{RULES.index(rule)}"}))
    plot_perplexity_vs_compute(curves, result["ppl_all_experts"], f"what tau is a fraction of: {result['checkpoint_name']}",
                               path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a D2DMoE checkpoint of the embedded Gemma 3 270M (d2dmoe-convert)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--budgets", default="0.3,0.5,0.75", help="FFN budgets, with the routers' scores")
    ap.add_argument("--oracle-budgets", default="", help="FFN budgets, selecting on the experts' true output norms")
    ap.add_argument("--name", default=None, help="names the output files (default: the checkpoint's folder name)")
    args = ap.parse_args()
    rules = [r for r in args.rules.split(",") if r]
    if unknown := sorted(set(rules) - set(RULES)):
        raise SystemExit(f"--rules: unknown {unknown}. Fix: choose from {','.join(RULES)}")
    t0 = time.time()
    study, ca = load_study(args.checkpoint), CalibrateOptions()
    ckpt, model, calib, test = study.ckpt, study.model, study.calib, study.test
    if ckpt.d2dmoe.get("top_k"):
        raise SystemExit(f"{args.checkpoint} is a top-k (MoEfication) checkpoint. Fix: pass a D2DMoE one")
    set_selection(model, 0.0)
    ppl_all = perplexity(model, test, desc="all experts")
    runs = [(b, False) for b in args.budgets.split(",") if b] + [(b, True) for b in args.oracle_budgets.split(",") if b]
    points = []
    for budget, oracle in runs:
        for rule in rules:
            points.append(point(model, calib, test, rule, float(budget), oracle, ca.iterations))
            p = points[-1]
            print(f"budget {p['budget']:.2f} {rule:4s}{' oracle' if oracle else '       '} tau {p['tau']:.4f}  "
                  f"ppl {p['ppl']:.2f} at {p['ffn_fraction']:.1%}", flush=True)
    name = args.name or args.checkpoint.name
    result = {**provenance(), "checkpoint": str(args.checkpoint), "checkpoint_name": name,
              "checkpoint_d2dmoe": ckpt.d2dmoe, "calib_tokens": int(calib.numel()), "test_tokens": int(test.numel()),
              "ppl_all_experts": ppl_all, "seconds": round(time.time() - t0, 1), "points": points}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"selection-rule-study-{name}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"all experts {ppl_all:.2f}; wrote {out} (+ .png), {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
