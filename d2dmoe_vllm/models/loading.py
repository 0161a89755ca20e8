"""Weight loading by name, shared by the model files (the loop vLLM's older model files use)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from d2dmoe_vllm.config import CheckpointError


def load_named_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: tuple[tuple[str, str, str], ...] = (),
    skip_prefixes: tuple[str, ...] = (),
    skip_substrs: tuple[str, ...] = (),
) -> set[str]:
    """Copy checkpoint tensors into ``model``'s parameters.

    ``stacked`` lists (fused_param, checkpoint_name, shard_id) for vLLM's fused q/k/v projections.
    An unknown tensor name is an error: a checkpoint must hold exactly what the architecture needs.
    """
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if name.startswith(skip_prefixes) or any(s in name for s in skip_substrs):
            continue
        shard = None
        for fused, part, shard_id in stacked if name not in params else ():
            if part in name:
                name, shard = name.replace(part, fused), shard_id
                break
        if name not in params:
            raise CheckpointError(
                f"D2DMoE checkpoint: tensor {name!r} has no place in {type(model).__name__}. "
                "Fix: re-export the checkpoint with d2dmoe-convert (wrong architecture or layer count?)"
            )
        param = params[name]
        if shard is None:
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
        else:
            param.weight_loader(param, tensor, shard)
        loaded.add(name)
    return loaded
