"""What the dropped experts' mean output is worth: a study before the converter grows a compensation.

    python benchmarks/dropped_bias_study.py CHECKPOINT --out benchmarks/results   # ~20 min on 2 CPU cores

At a 50% budget a token drops half its experts, and what they would have added is lost. Part of it may be
predictable without running them: if an expert's output, when dropped, has a consistent mean, that mean
can be added back for free. Two forms, both fitted on training text (SOTU <= 2015) with the model running
its selection (so each layer sees the inputs it sees when serving), both scored by held-out perplexity on
the converter's own held-out tokens (the calibration's layout: its 2,048 calibration tokens skipped, the
next 4,096):

- ``layer``: one vector per FFN layer, the mean over tokens of the dropped experts' summed output. It is
  a shared output bias (``b_out``), which every kernel path already adds: no cost when serving.
- ``layer-weighted``: the same bias, each token weighted by 1 / ||its FFN output||^2: Gemma normalises the
  FFN output per token (post-FFN RMSNorm), so what counts is each token's relative error, not the sum's;
- ``expert``: one vector per expert, its mean output over the tokens that dropped it, added for each
  expert a token drops. A per-expert bias the kernels do not have; the study's upper bound for a mean.

Besides perplexity, each layer's local error on 1,024 of the held-out tokens (inputs as the plain
selection gives them, no correction upstream): ||dropped output - correction||^2 relative to ||FFN output||^2,
summed over tokens and per token (the mean of each token's ratio).

``--refit`` fits again with the first fit's correction running (later layers then see corrected inputs).
Budgets other than the checkpoint's own are set by bisecting one tau on the calibration tokens, as the
converter does. Writes ``dropped-bias-study-<name>.json`` + ``.png`` under ``--out``. The committed run (session 61) took the
README's main job converted at 50%: ``d2dmoe-convert GGUF /tmp/s61/b50 --budget 0.5 --dtype bfloat16 --router-steps 500`` (500: the default then), then
``--budgets 0.3,0.75 --name gemma3-270m-cpu-default``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from checkpoint_study import load_study, plot_perplexity_vs_compute
from d2dmoe_converter.calibrate import CalibrateOptions, bisect_tau
from d2dmoe_converter.corpus import token_sequences
from d2dmoe_converter.moe_model import ffn_fraction, ffn_layers, perplexity, run_base, set_selection
from d2dmoe_converter.routers import expert_hidden
from provenance import provenance

VARIANTS = ("none", "layer", "layer-weighted", "expert")


def expert_outputs(m, flat: torch.Tensor) -> torch.Tensor:
    """[T, E, d_out]: every expert's output on ``flat`` [T, d] (fp32)."""
    h = expert_hidden(flat.float(), m.t, m.activation)               # [T, E, e]
    return torch.bmm(h.transpose(0, 1), m.t["experts.w_out"]).transpose(0, 1)


class DroppedMeans:
    """Per FFN layer: the dropped experts' summed output over tokens, and per expert its output summed over
    the tokens that dropped it, with the counts; ``correction`` turns them into what a variant adds."""

    def __init__(self, layers):
        self.layers = layers
        E, d = layers[0].num_experts, layers[0].t["experts.w_out"].shape[2]
        self.sums = torch.zeros(len(layers), E, d, dtype=torch.float64)
        self.drops = torch.zeros(len(layers), E, dtype=torch.float64)
        self.weighted = torch.zeros(len(layers), d, dtype=torch.float64)   # sum of w_t * dropped output_t
        self.weights = torch.zeros(len(layers), dtype=torch.float64)       # sum of w_t = 1 / ||FFN output_t||^2
        self.tokens = 0

    def add(self, i: int, flat: torch.Tensor, mask: torch.Tensor) -> None:
        dropped = (~mask).double()                                   # [T, E]
        y = expert_outputs(self.layers[i], flat).double()
        self.sums[i] += torch.einsum("te,ted->ed", dropped, y)
        self.drops[i] += dropped.sum(0)
        w = 1.0 / y.sum(1).pow(2).sum(-1).clamp_min(1e-12)
        self.weighted[i] += torch.einsum("t,te,ted->d", w, dropped, y)
        self.weights[i] += w.sum()
        if i == 0:
            self.tokens += flat.shape[0]

    def correction(self, variant: str) -> list[torch.Tensor | None]:
        """Per layer: a [d] bias (``layer``) or an [E, d] table of means added per dropped expert (``expert``)."""
        if variant == "none":
            return [None] * len(self.layers)
        if variant == "layer":
            return [(s.sum(0) / self.tokens).float() for s in self.sums]
        if variant == "layer-weighted":
            return [(s / w).float() for s, w in zip(self.weighted, self.weights)]
        return [(s / d.clamp(min=1)[:, None]).float() for s, d in zip(self.sums, self.drops)]


def install(layers, correction: list[torch.Tensor | None], fit: DroppedMeans | None = None) -> list:
    """Forward hooks that add ``correction`` to each FFN's output (and feed ``fit`` the layer's input and
    selection); returns the handles to remove."""
    def hook(i):
        def add(m, args, out):
            flat = args[0].reshape(-1, args[0].shape[-1])
            c = correction[i]
            mask = m.select(flat) if (fit is not None or (c is not None and c.dim() == 2)) else None
            if fit is not None:  # not the first position (BOS): its outputs are outliers that would set the mean
                keep = torch.ones(args[0].shape[:-1], dtype=torch.bool)
                keep[..., 0] = False
                fit.add(i, flat[keep.reshape(-1)], mask[keep.reshape(-1)])
            if c is None:
                return out
            extra = c if c.dim() == 1 else ((~mask).float() @ c).reshape(out.shape)  # [d] or [.., d]
            return out + extra.to(out.dtype)
        return add
    return [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]


@torch.no_grad()
def fit_means(model, layers, seqs: torch.Tensor, correction: list, batch: int = 4) -> DroppedMeans:
    fit = DroppedMeans(layers)
    handles = install(layers, correction, fit)
    try:
        for i in tqdm(range(0, len(seqs), batch), desc="fit: dropped experts' means", leave=False):
            run_base(model, seqs[i : i + batch], batch)
    finally:
        for h in handles:
            h.remove()
    return fit


@torch.no_grad()
def local_errors(layers, seqs: torch.Tensor, fit: DroppedMeans, model) -> dict:
    """Per variant and layer: (summed, per-token) relative error of the FFN output the selection loses, after
    the correction, on ``seqs`` (first positions left out, as in the fit)."""
    corr = {v: fit.correction(v) for v in VARIANTS}
    acc = {v: torch.zeros(len(layers), 2, dtype=torch.float64) for v in VARIANTS}
    norms = torch.zeros(len(layers), 2, dtype=torch.float64)   # summed ||full||^2, tokens

    def hook(i):
        def f(m, args, out):
            flat = args[0][:, 1:].reshape(-1, args[0].shape[-1])
            mask = m.select(flat)
            y = expert_outputs(m, flat).double()
            full = y.sum(1).pow(2).sum(-1)
            lost = (y * (~mask)[..., None]).sum(1)
            norms[i] += torch.stack([full.sum(), torch.tensor(float(len(full)), dtype=torch.float64)])
            for v, c in corr.items():
                c = c[i]
                r = lost if c is None else lost - (c.double() if c.dim() == 1 else (~mask).double() @ c.double())
                e = r.pow(2).sum(-1)
                acc[v][i] += torch.stack([e.sum(), (e / full.clamp_min(1e-12)).sum()])
        return f
    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(layers)]
    try:
        run_base(model, seqs, 4)
    finally:
        for h in handles:
            h.remove()
    return {v: {"summed": (a[:, 0] / norms[:, 0]).tolist(), "per_token": (a[:, 1] / norms[:, 1]).tolist()}
            for v, a in acc.items()}


def scored(model, layers, seqs: torch.Tensor, correction: list, tau: float, layer_tau, desc: str) -> dict:
    set_selection(model, tau, layer_tau=layer_tau)
    handles = install(layers, correction)
    try:
        ppl = perplexity(model, seqs, desc=desc)
    finally:
        for h in handles:
            h.remove()
    return {"ppl": ppl, "ffn_fraction": ffn_fraction(model)}


def plot(result: dict, path: Path) -> None:
    curves = [(v, [(p["variants"][v]["ffn_fraction"], p["variants"][v]["ppl"]) for p in result["points"]],
               {"marker": marker}) for v, marker in zip(result["points"][0]["variants"], "os^v")]
    plot_perplexity_vs_compute(curves, result["ppl_all_experts"],
                               f"dropped experts' mean added back: {result['checkpoint_name']}", path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", type=Path, help="a D2DMoE checkpoint of the embedded Gemma 3 270M (d2dmoe-convert)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--budgets", default="", help="FFN budgets besides the checkpoint's own tau, e.g. 0.3,0.75")
    ap.add_argument("--fit-seqs", type=int, default=16, help="256-token SOTU training sequences to fit the means on")
    ap.add_argument("--refit", action="store_true", help="fit again with the first fit's correction running")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default=None, help="names the output files (default: the checkpoint's folder name)")
    args = ap.parse_args()
    t0 = time.time()
    study, ca = load_study(args.checkpoint), CalibrateOptions()
    ckpt, model, calib, test = study.ckpt, study.model, study.calib, study.test
    layers = ffn_layers(model)
    fit_seqs = token_sequences(study.tokenizer, study.corpus.train, args.fit_seqs, ca.seq_len, bos=study.bos,
                               shuffle_seed=args.seed + 17, what="fit")
    own_tau, layer_tau = float(ckpt.d2dmoe.get("tau", 0.0)), tuple(ckpt.d2dmoe.get("layer_tau") or ())
    settings = [("checkpoint", own_tau, layer_tau)]
    for b in (float(x) for x in args.budgets.split(",") if x):
        tau, _, _ = bisect_tau(model, calib, b, ca.iterations)
        settings.append((f"budget {b:g}", tau, ()))
    ppl_all = scored(model, layers, test, [None] * len(layers), 0.0, (), "all experts")["ppl"]
    points = []
    for label, tau, lt in settings:
        set_selection(model, tau, layer_tau=lt)
        fit = fit_means(model, layers, fit_seqs, [None] * len(layers))
        if args.refit:
            fit = fit_means(model, layers, fit_seqs, fit.correction("layer"))
        set_selection(model, tau, layer_tau=lt)
        local = local_errors(layers, test[:4], fit, model)
        variants = {v: scored(model, layers, test, fit.correction(v), tau, lt, f"{label}: {v}") for v in VARIANTS}
        for v in VARIANTS:
            variants[v]["local_error"] = local[v]
        drop_share = float(fit.drops.sum() / (fit.tokens * fit.drops.shape[0] * fit.drops.shape[1]))
        points.append({"setting": label, "tau": tau, "layer_tau": list(lt), "dropped_share_fit": drop_share,
                       "variants": variants})
        print(f"{label:12s} tau {tau:.4f}  " + "  ".join(
            f"{v}: {r['ppl']:.2f} at {r['ffn_fraction']:.1%}" for v, r in variants.items()), flush=True)
        print("  local error, mean over layers (summed / per token): " + "  ".join(
            f"{v} {sum(r['local_error']['summed']) / len(layers):.4f} / {sum(r['local_error']['per_token']) / len(layers):.4f}"
            for v, r in variants.items()), flush=True)
    name = args.name or args.checkpoint.name
    report = args.checkpoint / "d2dmoe_report.json"
    result = {**provenance(), "checkpoint": str(args.checkpoint), "checkpoint_name": name, "checkpoint_d2dmoe": ckpt.d2dmoe,
              "checkpoint_report": json.loads(report.read_text()) if report.is_file() else None,
              "fit_tokens": int(fit_seqs.numel()), "test_tokens": int(test.numel()), "refit": args.refit,
              "ppl_all_experts": ppl_all, "seconds": round(time.time() - t0, 1), "points": points}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"dropped-bias-study-{name}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"all experts {ppl_all:.2f}; wrote {out} (+ .png), {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
