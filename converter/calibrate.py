"""Stage 4, calibrate: choose tau (D2DMoE) or k (MoEfication) for a compute budget, on held-out text.

The budget is the executed fraction of FFN (expert) compute: executed token-expert pairs x expert
size over tokens x d_ff, counted per token on the calibration tokens by the torch reference model.
The fraction falls as tau rises (tau = 0 runs every expert, tau = 1 only the arg-max), so tau is
found by bisection: the smallest tau whose fraction is <= budget, to within the bisection width.
Quality (held-out perplexity, dense vs converted) is then measured on separate held-out tokens.

With ``per_layer`` (``--tau-per-layer``), each FFN layer gets its own tau: one tau leaves layers
executing very different fractions whatever dropping experts there costs. Each layer alone is run at
a grid of multiples of the global tau (the others run every expert) to get its (delta NLL, fraction)
curve; then for a price lambda each layer takes the grid point minimising delta NLL + lambda x its
share of FFN compute x fraction, and lambda is bisected until the *measured* fraction of all layers
together is within the budget. The losses do not add up (thinning early layers changes what the later
ones see), so that allocation overshoots: the candidates are one tau moved 25/50/75/100% of the way
toward it, each scaled to spend the budget, and the best calibration NLL is kept if it beats one
tau's. Cost: layers x 5 perplexity passes over ``sensitivity_tokens``, ~5 x ``iterations`` passes over
the calibration tokens without the LM head (the price's bisection, then each candidate's scale), and one
perplexity pass per candidate.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from d2dmoe_converter.corpus import token_sequences
from d2dmoe_converter.moe_model import (expert_layers, ffn_fraction, ffn_layers, perplexity, projection_fraction, run_base,
                                        set_selection)


@dataclass(frozen=True)
class CalibrateOptions:
    budget: float | None = None   # fraction of FFN compute in (0, 1]; None: keep the given tau
    tokens: int = 2048            # held-out tokens that set tau
    eval_tokens: int = 4096       # further held-out tokens for perplexity and the reported fraction
    seq_len: int = 256
    iterations: int = 12          # bisection steps (tau resolution 2^-12)
    per_layer: bool = False       # a tau per FFN layer (see the module docstring)
    sensitivity_tokens: int = 1024  # calibration tokens of each per-layer sensitivity pass
    tau_grid: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0, 3.0)  # per-layer taus tried, as multiples of the global tau
    blends: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)  # candidates: one tau moved this far toward the allocation
    reference: str = "max"        # what tau is a fraction of: the top score (the paper's) or the scores' sum

    def stage_key(self) -> dict:
        """What the calibration stage's fingerprint holds: every field, less the per-layer ones when
        calibrating one tau (changing them must not redo it; work dirs from before keep their stage), and
        less the reference when it is the paper's max (so those work dirs keep theirs too)."""
        fields = asdict(self)
        if self.reference == "max":
            del fields["reference"]
        if not self.per_layer:
            return {k: v for k, v in fields.items() if k not in PER_LAYER_FIELDS}
        # session 43: the candidates' scale takes ``iterations`` bisection steps (before, half: ~1% under budget)
        return {**fields, "scale_steps": "iterations"}


PER_LAYER_FIELDS = ("per_layer", "sensitivity_tokens", "tau_grid", "blends")


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


def bisect_within(fraction, lo: float, hi: float, budget: float, iterations: int, desc: str,
                  f_hi: float | None = None) -> tuple[float, float | None, list]:
    """Smallest x in [lo, hi] found by bisection with ``fraction(x)`` <= budget, for a fraction that
    falls as x rises: (x, its fraction, trace of (x, fraction)); (hi, f_hi, ...) if no step got within."""
    trace = []
    for _ in tqdm(range(iterations), desc=desc):
        mid = (lo + hi) / 2
        f = fraction(mid)
        trace.append((mid, f))
        if f > budget:
            lo = mid
        else:
            hi, f_hi = mid, f
    return hi, f_hi, trace


def heldout_sequences(tokenizer, docs: tuple[str, ...], opts: CalibrateOptions, bos: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) sequences from the held-out text: the first ``opts.tokens`` set tau, the next
    ``opts.eval_tokens`` measure perplexity and the reported fraction (the converter's report's tokens)."""
    n_cal, n_eval = -(-opts.tokens // opts.seq_len), -(-opts.eval_tokens // opts.seq_len)
    held = token_sequences(tokenizer, docs, n_cal + n_eval, opts.seq_len, bos=bos,
                           what=f"calibrate ({opts.tokens} + {opts.eval_tokens} held-out tokens)")
    return held[:n_cal], held[n_cal:]


def bisect_tau(model, seqs: torch.Tensor, budget: float, iterations: int) -> tuple[float, float, list]:
    """(tau, its fraction, trace of (tau, fraction)): smallest tau found with fraction <= budget."""
    trace = [(1.0, measure_fraction(model, seqs, 1.0))]
    if budget >= 1.0:
        return 0.0, 1.0, [(0.0, 1.0)]
    if trace[0][1] > budget:  # even one expert per token costs more than the budget
        return 1.0, trace[0][1], trace
    tau, f, steps = bisect_within(lambda t: measure_fraction(model, seqs, t), 0.0, 1.0, budget, iterations,
                                  f"calibrate: tau for {budget:.0%} of FFN compute", f_hi=trace[0][1])
    return tau, f, sorted(trace + steps)


def scale_to_budget(model, calib: torch.Tensor, budget: float, tau: float, layer_tau=(), iterations: int = 12,
                    desc: str = "calibrate: scale") -> tuple[float, list[float], float] | None:
    """The selection scaled by one factor to spend ``budget`` on ``calib``: (tau, layer_tau, fraction), each
    tau capped at 1; with ``layer_tau`` the FFN taus are scaled (``tau``, for attention experts, is kept),
    without it ``tau``. None if no factor in [0, 2] gets within the budget."""
    def scaled(x: float) -> tuple[float, list[float]]:
        return (tau if layer_tau else min(1.0, x * tau)), [min(1.0, x * t) for t in layer_tau]

    def fraction(x: float) -> float:
        t, lt = scaled(x)
        set_selection(model, t, layer_tau=lt)
        run_base(model, calib)
        return ffn_fraction(model)

    # as many steps as one tau's bisection: with half (the scale's step 2/64), the GPU recipe's per-layer
    # points landed 0.8-1.1% of FFN compute under the budget on the calibration tokens (sessions 42-43),
    # so they were not compared with one tau at equal compute
    x, f, _ = bisect_within(fraction, 0.0, 2.0, budget, iterations, desc)
    return None if f is None else (*scaled(x), f)


def mean_nll(model, seqs: torch.Tensor) -> float:
    return math.log(perplexity(model, seqs))


def layer_sensitivity(model, seqs: torch.Tensor, taus: list[float],
                      projection_tau: float = 0.0) -> list[list[tuple[float, float]]]:
    """Per layer [(delta NLL against every FFN expert running, that layer's fraction)] at each tau in
    ``taus`` with that FFN alone selecting: what dropping experts costs in each layer. Attention-projection
    experts, if any, run at ``projection_tau`` throughout."""
    layers = ffn_layers(model)
    set_selection(model, projection_tau, layer_tau=[0.0] * len(layers))
    base = mean_nll(model, seqs)
    curves = [[] for _ in layers]
    bar = tqdm(total=len(layers) * len(taus), desc="calibrate: per-layer sensitivity")
    for l, layer in enumerate(layers):
        for t in taus:
            if t == 0.0:  # every expert: the base model itself, nothing to run
                curves[l].append((0.0, 1.0))
            else:
                set_selection(model, projection_tau, layer_tau=[t if i == l else 0.0 for i in range(len(layers))])
                curves[l].append((mean_nll(model, seqs) - base, layer.fraction))
            bar.update()
    bar.close()
    return curves


def allocate(curves: list[list[tuple[float, float]]], taus: list[float], weights: list[float], price: float) -> list[float]:
    """Per layer, the tau minimising delta NLL + price x weight x fraction (weights: FFN compute shares)."""
    return [taus[min(range(len(taus)), key=lambda g: c[g][0] + price * w * c[g][1])] for c, w in zip(curves, weights)]


def per_layer_taus(model, calib: torch.Tensor, budget: float, tau: float, opts: CalibrateOptions) -> dict:
    """A tau per FFN layer within ``budget`` (module docstring); compared with one ``tau`` on ``calib``."""
    layers = ffn_layers(model)
    taus = sorted({0.0, *(min(1.0, g * tau) for g in opts.tau_grid)})
    seqs = calib[: max(1, opts.sensitivity_tokens // calib.shape[1])]
    curves = layer_sensitivity(model, seqs, taus, projection_tau=tau)
    sizes = [m.num_experts * m.t["experts.w_in"].shape[1] for m in layers]
    weights = [n / sum(sizes) for n in sizes]

    def joint_fraction(alloc: list[float]) -> float:
        set_selection(model, tau, layer_tau=alloc)  # attention experts, if any, at the one tau
        run_base(model, calib)
        return ffn_fraction(model)

    # Bisect log(price): the cheapest price whose allocation's measured fraction is within the budget.
    log_price, _, _ = bisect_within(lambda x: joint_fraction(allocate(curves, taus, weights, math.exp(x))),
                                    -12.0, 12.0, budget, opts.iterations,
                                    f"calibrate: per-layer taus for {budget:.0%} of FFN compute")
    grid_choice = allocate(curves, taus, weights, math.exp(log_price))

    # The layers' losses do not add (thinning early layers changes what later ones see), so the additive
    # allocation overshoots: try one tau moved part of the way toward it, each scaled to spend the budget
    # (the grid is coarse), and keep the best calibration NLL, if it beats one tau's.
    def scaled_to_budget(alloc: list[float]) -> tuple[list[float], float] | None:
        found = scale_to_budget(model, calib, budget, tau, alloc, opts.iterations, "calibrate: per-layer candidate, scale")
        return None if found is None else (found[1], found[2])

    candidates = []
    for blend in tqdm(opts.blends, desc="calibrate: per-layer candidates"):
        found = scaled_to_budget([(1 - blend) * tau + blend * g for g in grid_choice])
        if found is not None:
            set_selection(model, tau, layer_tau=found[0])
            candidates.append({"blend": blend, "layer_tau": found[0], "fraction": found[1],
                               "calib_nll": mean_nll(model, calib)})
    set_selection(model, tau)
    nll_one = mean_nll(model, calib)
    best = min(candidates, key=lambda c: c["calib_nll"], default=None)
    keep = best is not None and best["calib_nll"] < nll_one
    return {"layer_tau": best["layer_tau"] if keep else None, "best": best, "one_tau_calib_nll": nll_one,
            "candidates": candidates, "grid_choice": grid_choice, "grid": taus,
            "sensitivity": [[{"tau": t, "delta_nll": d, "fraction": f} for t, (d, f) in zip(taus, c)] for c in curves]}


def calibrate(model, calib: torch.Tensor, heldout: torch.Tensor, method: str, budget: float | None, tau: float,
              opts: CalibrateOptions = CalibrateOptions()) -> dict:
    """Pick the setting for ``budget`` (or keep ``tau``), then measure fraction and perplexity."""
    E = ffn_layers(model)[0].num_experts
    result: dict = {"method": method, "budget": budget}
    if method == "moefication":
        k = E if budget is None else max(1, min(E, round(budget * E)))
        result.update(top_k=k, tau=0.0, calib_fraction=measure_fraction(model, calib, 0.0, k))
    elif budget is not None:
        tau, f, trace = bisect_tau(model, calib, budget, opts.iterations)
        result.update(top_k=0, tau=tau, calib_fraction=f, trace=[{"tau": t, "ffn_fraction": x} for t, x in trace])
        if opts.per_layer and 0.0 < tau < 1.0:
            result["per_layer"] = per_layer_taus(model, calib, budget, tau, opts)
            result["layer_tau"] = result["per_layer"]["layer_tau"]
        elif opts.per_layer:
            result["per_layer"] = {"layer_tau": None, "skipped": f"one tau = {tau:g} already runs "
                                   + ("every expert" if tau == 0.0 else "only the top expert")}
    else:
        result.update(top_k=0, tau=tau, calib_fraction=measure_fraction(model, calib, tau))
    result.update(measure_quality(model, heldout, result["tau"], result["top_k"], result.get("layer_tau") or ()))
    result["calib_tokens"] = int(calib.numel())
    return result


def measure_quality(model, heldout: torch.Tensor, tau: float, top_k: int = 0, layer_tau=(), stage: str = "calibrate") -> dict:
    """Held-out perplexity with every expert running (the dense model exactly) and at the selection
    (``tau`` / ``top_k`` / ``layer_tau``), with the executed fractions and experts per token there."""
    set_selection(model, 0.0, 0)  # every expert: the (ReLU-fied) dense model exactly
    result = {"ppl_dense": perplexity(model, heldout, desc=f"{stage}: perplexity, all experts")}
    set_selection(model, tau, top_k, layer_tau=layer_tau)
    for m in expert_layers(model):
        m.record, m.per_token = True, []
    result["ppl_converted"] = perplexity(model, heldout, desc=f"{stage}: perplexity, converted")
    result["ffn_fraction"] = ffn_fraction(model)
    if projection_fraction(model) is not None:  # attention projections as experts run at the same tau
        result["projection_fraction"] = projection_fraction(model)
    result["layer_fraction"] = [m.fraction for m in ffn_layers(model)]
    result["experts_per_token_mean"] = [float(torch.cat(m.per_token).float().mean()) for m in ffn_layers(model)]
    for m in expert_layers(model):
        m.record, m.per_token = False, []
    result["heldout_tokens"] = int(heldout.numel())
    return result
