"""``d2dmoe-convert``: the command-line front of the converter."""

from __future__ import annotations

import argparse
import sys

from d2dmoe_converter.convert import DTYPES, SPLITS, ConvertOptions, convert
from d2dmoe_vllm.config import CheckpointError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="d2dmoe-convert", description="Convert a dense GPT-2/Gemma checkpoint "
                                 "(Hugging Face safetensors dir or .gguf file) into a D2DMoE checkpoint for vLLM.")
    ap.add_argument("input", help="dense model directory (config.json + *.safetensors) or .gguf file")
    ap.add_argument("output", help="directory to write the D2DMoE checkpoint to")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--expert-size", type=int, help="neurons per expert (must divide d_ff; default d_ff/32)")
    g.add_argument("--num-experts", type=int, help="experts per FFN layer (must divide d_ff)")
    ap.add_argument("--split", choices=SPLITS, default="kmeans",
                    help="how neurons are grouped into experts (default: balanced k-means)")
    ap.add_argument("--relu", action="store_true", help="ReLU-fy the FFN (GPT-2) / gate (Gemma) activation")
    ap.add_argument("--tau", type=float, default=0.0, help="run expert e iff R_e >= tau * max R (default 0: all)")
    ap.add_argument("--router-width", type=int, default=128, help="router hidden width (default 128)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="auto", help="weight dtype to write (default: as input)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    args = ap.parse_args(argv)
    opts = ConvertOptions(expert_size=args.expert_size, num_experts=args.num_experts, relufy=args.relu, split=args.split,
                          tau=args.tau, router_width=args.router_width, dtype=args.dtype, seed=args.seed,
                          overwrite=args.overwrite)
    try:
        report = convert(args.input, args.output, opts)
    except (CheckpointError, ValueError, FileExistsError) as err:
        print(f"d2dmoe-convert: error: {err}", file=sys.stderr)
        return 2
    print("d2dmoe-convert: done")
    for k, v in report.items():
        print(f"  {k:18s} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
