"""Which neurons make an expert: the weights' k-means (the paper's split) against co-activation.

    python benchmarks/split_study.py --out benchmarks/results            # ~10 min on 2 CPU cores

D2DMoE groups an FFN's neurons by balanced k-means on the first layer's normalised rows (the gate's for
Gemma): neurons with similar weights go together. What the method needs is neurons that *fire* together:
then a token's few large activations fall in few experts and dropping the rest loses little. This measures,
before the converter grows an option, how much of each FFN's output the experts a token would keep carry
under three splits of the same neurons into 32 experts of 64 (the CPU main job's layout):

- ``kmeans``: the converter's split (``balanced_kmeans_order`` on the gate rows);
- ``coactivation``: the same balanced k-means on each neuron's activation profile, |h_j| over 4,096 SOTU
  training tokens (h = act(gate x) * up x, the input of the down projection), so the cosine that k-means
  maximises is how often and how strongly two neurons are large on the same tokens (``coactivation_order``,
  what ``d2dmoe-convert --split coactivation`` runs);
- ``contiguous``: neurons in their stored order (no grouping; the floor).

For 2,048 held-out SOTU tokens (2016-2021), every expert's true output y_e = W_down[:, e] h_e is computed and
the experts are kept by the oracle rule (largest ||y_e|| first: no router error), at 25% and 50% of the
experts per token (top-k) and by D2DMoE's rule ||y_e|| >= tau * max_e ||y_e|| with tau bisected per layer to
a mean of 50%. The score is the relative error ||y - sum_kept y_e||^2 / ||y||^2 of the FFN output, per
layer and averaged over layers. Two models: the original (GELU-tanh gate, the CPU main job's) and the same
weights with the gate ReLU-fied and not fine-tuned (the GPU recipe's starting point). Writes
``split-study-gemma3-270m.json`` + ``.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from d2dmoe_converter.convert import dense_activation
from d2dmoe_converter.corpus import load_corpus, token_sequences
from d2dmoe_converter.dense import DenseModel, load_dense, load_tokenizer
from d2dmoe_converter.hf_model import build_model, relu_config
from d2dmoe_converter.kmeans import balanced_kmeans_order
from d2dmoe_converter.routers import capture_ffn_inputs
from d2dmoe_converter.split import coactivation_order, contiguous_order, dense_ffn, dense_hidden
from d2dmoe_vllm.demo import default_model_gguf
from provenance import provenance

SPLITS = ("kmeans", "coactivation", "contiguous")


def ffn_inputs(dense: DenseModel, seqs: torch.Tensor, out_dir: Path) -> list[torch.Tensor]:
    """Each FFN's input x [tokens, d] for ``seqs`` (the converter's capture, through .npy files)."""
    out_dir.mkdir(parents=True)
    return [torch.from_numpy(np.load(p)) for p in capture_ffn_inputs(build_model(dense), seqs, out_dir, desc="forward")]


def expert_norms_and_outputs(h: torch.Tensor, w_out: torch.Tensor, order: torch.Tensor, E: int):
    """Per token and expert (``w_out`` [d_ff, d], as ``dense_ffn`` gives it): the expert's output [T, E, d]
    and its norm [T, E]."""
    T, size = h.shape[0], h.shape[1] // E
    hs = h[:, order].view(T, E, size)
    ws = w_out[order].view(E, size, -1)                          # [E, size, d]
    y = torch.einsum("tes,esd->ted", hs, ws)
    return y, y.norm(dim=-1)


def kept_error(y: torch.Tensor, keep: torch.Tensor) -> float:
    full = y.sum(1)
    return float(((full - (y * keep[..., None]).sum(1)).pow(2).sum() / full.pow(2).sum()))


def tau_keep(norms: torch.Tensor, fraction: float) -> torch.Tensor:
    """D2DMoE's rule, tau bisected so the mean kept fraction is ``fraction``."""
    ref = norms.amax(1, keepdim=True)
    lo, hi = 0.0, 1.0
    for _ in range(30):
        tau = (lo + hi) / 2
        if (norms >= tau * ref).float().mean() > fraction:
            lo = tau
        else:
            hi = tau
    return norms >= hi * ref


def topk_keep(norms: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(norms, dtype=torch.bool).scatter_(1, norms.topk(k, dim=1).indices, True)


def study(dense: DenseModel, fit: torch.Tensor, test: torch.Tensor, E: int, seed: int, work: Path) -> dict:
    xs_fit, xs_test = ffn_inputs(dense, fit, work / "fit"), ffn_inputs(dense, test, work / "test")
    activation = dense_activation(dense)
    rows = []
    for i in tqdm(range(dense.num_layers), desc="layers"):
        ffn = {k: None if v is None else v.float() for k, v in dense_ffn(dense, i).items()}
        with torch.no_grad():
            h_fit, h_test = dense_hidden(xs_fit[i], ffn, activation), dense_hidden(xs_test[i], ffn, activation)
            orders = {"kmeans": balanced_kmeans_order(ffn["w_in"], E, seed=seed + i),
                      "coactivation": coactivation_order(h_fit, E, seed=seed + i),
                      "contiguous": contiguous_order(h_fit.shape[1])}
            row = {"layer": i, "zero_fraction": float((h_test == 0).float().mean())}
            for name, order in orders.items():
                y, norms = expert_norms_and_outputs(h_test, ffn["w_out"], order, E)
                row[name] = {"top50": kept_error(y, topk_keep(norms, E // 2)),
                             "top25": kept_error(y, topk_keep(norms, E // 4)),
                             "tau50": kept_error(y, tau_keep(norms, 0.5))}
        rows.append(row)
    mean = {name: {k: sum(r[name][k] for r in rows) / len(rows) for k in ("top50", "top25", "tau50")} for name in SPLITS}
    return {"layers": rows, "mean": mean}


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (model_name, r) in zip(axes[0], results.items()):
        for name in SPLITS:
            ax.plot([row["layer"] for row in r["layers"]], [row[name]["tau50"] for row in r["layers"]], marker="o",
                    label=f"{name} (mean {r['mean'][name]['tau50']:.3f})")
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("relative FFN output error, oracle tau at 50% of experts")
        ax.set_title(f"Gemma 3 270M, {model_name}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--fit-seqs", type=int, default=16, help="256-token SOTU training sequences for co-activation")
    ap.add_argument("--test-seqs", type=int, default=8, help="256-token held-out SOTU sequences to score on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    cache = Path.home() / ".cache" / "d2dmoe-vllm"
    dense = load_dense(default_model_gguf(cache))
    tok = load_tokenizer(dense)
    corpus = load_corpus()
    bos = dense.bos_token_id(tok)
    fit = token_sequences(tok, corpus.train, args.fit_seqs, 256, bos=bos, shuffle_seed=args.seed, what="fit")
    test = token_sequences(tok, corpus.heldout, args.test_seqs, 256, bos=bos, what="test")
    results = {}
    relu = DenseModel(relu_config(dense.config), dense.state, dense.source, dense.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, model) in enumerate((("original (GELU-tanh gate)", dense), ("gate ReLU-fied, not fine-tuned", relu))):
            results[name] = study(model, fit, test, args.experts, args.seed, Path(tmp) / str(i))
    print(f"\nrelative FFN output error (oracle selection), mean over layers; {args.experts} experts")
    print(f"{'model':32s} {'split':13s} {'top-50%':>9s} {'top-25%':>9s} {'tau@50%':>9s}")
    for model_name, r in results.items():
        for name in SPLITS:
            m = r["mean"][name]
            print(f"{model_name:32s} {name:13s} {m['top50']:9.4f} {m['top25']:9.4f} {m['tau50']:9.4f}")
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {**provenance(), "experts": args.experts, "fit_tokens": fit.numel(), "test_tokens": test.numel(),
           "seconds": round(time.time() - t0, 1), "models": results}
    (args.out / "split-study-gemma3-270m.json").write_text(json.dumps(doc, indent=1))
    plot(results, args.out / "split-study-gemma3-270m.png")
    print("wrote", args.out / "split-study-gemma3-270m.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
