"""Stage 4, calibrate: choose tau (D2DMoE) or k (MoEfication) for a compute budget, on held-out text.

The budget is the executed fraction of FFN (expert) compute: executed token-expert pairs x expert
size over tokens x d_ff, counted per token on the calibration tokens by the torch reference model.
The fraction falls as tau rises (tau = 0 runs every expert, tau = 1 only the arg-max), so tau is
found by bisection: the smallest tau whose fraction is <= budget, to within the bisection width.
Quality (held-out perplexity, dense vs converted) is then measured on separate held-out tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from d2dmoe_converter.moe_model import expert_layers, ffn_fraction, ffn_layers, perplexity, projection_fraction, run_base, set_selection


@dataclass(frozen=True)
class CalibrateOptions:
    budget: float | None = None   # fraction of FFN compute in (0, 1]; None: keep the given tau
    tokens: int = 2048            # held-out tokens that set tau
    eval_tokens: int = 4096       # further held-out tokens for perplexity and the reported fraction
    seq_len: int = 256
    iterations: int = 12          # bisection steps (tau resolution 2^-12)


def check_budget(budget: float | None) -> float | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"--budget {budget!r} is out of range: give the fraction of FFN compute to keep, "
                         "in (0, 1] (e.g. 0.5 runs half the experts' compute; 1 runs all of it)")
    return float(budget)


def measure_fraction(model, seqs: torch.Tensor, tau: float, top_k: int = 0) -> float:
    set_selection(model, tau, top_k)
    run_base(model, seqs)
    return ffn_fraction(model)


def bisect_tau(model, seqs: torch.Tensor, budget: float, iterations: int) -> tuple[float, float, list]:
    """(tau, its fraction, trace of (tau, fraction)): smallest tau found with fraction <= budget."""
    trace = [(1.0, measure_fraction(model, seqs, 1.0))]
    if budget >= 1.0:
        return 0.0, 1.0, [(0.0, 1.0)]
    if trace[0][1] > budget:  # even one expert per token costs more than the budget
        return 1.0, trace[0][1], trace
    lo, hi, f_hi = 0.0, 1.0, trace[0][1]
    for _ in tqdm(range(iterations), desc=f"calibrate: tau for {budget:.0%} of FFN compute"):
        mid = (lo + hi) / 2
        f = measure_fraction(model, seqs, mid)
        trace.append((mid, f))
        if f > budget:
            lo = mid
        else:
            hi, f_hi = mid, f
    return hi, f_hi, sorted(trace)


def calibrate(model, calib: torch.Tensor, heldout: torch.Tensor, method: str, budget: float | None, tau: float,
              iterations: int) -> dict:
    """Pick the setting for ``budget`` (or keep ``tau``), then measure fraction and perplexity."""
    E = ffn_layers(model)[0].num_experts
    result: dict = {"method": method, "budget": budget}
    if method == "moefication":
        k = E if budget is None else max(1, min(E, round(budget * E)))
        result.update(top_k=k, tau=0.0, calib_fraction=measure_fraction(model, calib, 0.0, k))
    elif budget is not None:
        tau, f, trace = bisect_tau(model, calib, budget, iterations)
        result.update(top_k=0, tau=tau, calib_fraction=f, trace=[{"tau": t, "ffn_fraction": x} for t, x in trace])
    else:
        result.update(top_k=0, tau=tau, calib_fraction=measure_fraction(model, calib, tau))
    set_selection(model, 0.0, 0)  # every expert: the (ReLU-fied) dense model exactly
    result["ppl_dense"] = perplexity(model, heldout, desc="calibrate: perplexity, all experts")
    set_selection(model, result["tau"], result["top_k"])
    for m in expert_layers(model):
        m.record, m.per_token = True, []
    result["ppl_converted"] = perplexity(model, heldout, desc="calibrate: perplexity, converted")
    result["ffn_fraction"] = ffn_fraction(model)
    if projection_fraction(model) is not None:  # attention projections as experts run at the same tau
        result["projection_fraction"] = projection_fraction(model)
    result["layer_fraction"] = [m.pairs / max(1, m.tokens * m.num_experts) for m in ffn_layers(model)]
    result["experts_per_token_mean"] = [float(torch.cat(m.per_token).float().mean()) for m in ffn_layers(model)]
    for m in expert_layers(model):
        m.record, m.per_token = False, []
    result["heldout_tokens"] = int(heldout.numel())
    result["calib_tokens"] = int(calib.numel())
    return result
