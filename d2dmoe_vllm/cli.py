"""``d2dmoe-validate``: check a D2DMoE checkpoint directory without starting vLLM."""

from __future__ import annotations

import argparse
import sys

from d2dmoe_vllm.checkpoint import validate_checkpoint
from d2dmoe_vllm.config import CheckpointError


def validate_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="d2dmoe-validate", description=__doc__)
    ap.add_argument("checkpoint")
    args = ap.parse_args(argv)
    try:
        cfg = validate_checkpoint(args.checkpoint)
    except CheckpointError as err:
        print(f"d2dmoe-validate: {err}", file=sys.stderr)
        return 2
    print(f"{args.checkpoint}: valid D2DMoE checkpoint, {len(cfg.num_experts)} expert layers, "
          f"{cfg.num_experts[0]} experts of {cfg.expert_size[0]}, {cfg.describe_tau()}")
    return 0
