"""The one new idea in our model files: an FFN run as dynamic-k experts.

``ExpertRouter`` (Linear -> ReLU -> Linear -> abs) predicts each expert's output norm; the opaque op
``torch.ops.d2dmoe.dynamic_k_experts`` runs the router, selects experts (R_e >= tau * max R) and
computes only those (on the GPU the router is fused into the op's kernels). Parameter names match
the checkpoint (see ``checkpoint.expert_tensor_shapes``).
"""

from __future__ import annotations

import torch
from torch import nn

from d2dmoe_kernels.op import COUNTER_SLOTS
from d2dmoe_kernels.reference import router_scores
from d2dmoe_vllm.config import CheckpointError, D2DMoEConfig


def checked_weight_loader(name: str):
    """A vLLM weight_loader that names the tensor and both shapes when they disagree."""

    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        if tuple(param.shape) != tuple(loaded.shape):
            raise CheckpointError(
                f"D2DMoE checkpoint: {name}: has shape {list(loaded.shape)}, config.json implies "
                f"{list(param.shape)}. Fix: make d2dmoe.num_experts/expert_size/router_width match the weights"
            )
        param.data.copy_(loaded)

    return load


def _param(prefix: str, name: str, *shape: int) -> nn.Parameter:
    p = nn.Parameter(torch.empty(*shape), requires_grad=False)
    p.weight_loader = checked_weight_loader(f"{prefix}.{name}")
    return p


class ExpertRouter(nn.Module):
    """Regression router: predicts ||expert_e(x)||_2 for every expert."""

    def __init__(self, hidden_size: int, width: int, num_experts: int, prefix: str):
        super().__init__()
        self.in_proj = nn.Module()
        self.in_proj.weight = _param(f"{prefix}.in_proj", "weight", width, hidden_size)
        self.out_proj = nn.Module()
        self.out_proj.weight = _param(f"{prefix}.out_proj", "weight", num_experts, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return router_scores(x, self.in_proj.weight, self.out_proj.weight)


class DynamicKMLP(nn.Module):
    """Drop-in replacement for a dense FFN (plain GPT-2 style or gated Gemma style)."""

    def __init__(self, cfg: D2DMoEConfig, layer: int, hidden_size: int, prefix: str):
        super().__init__()
        E, e = cfg.num_experts[layer], cfg.expert_size[layer]
        self.layer = layer
        self.num_experts, self.expert_size = E, e
        self.tau, self.top_k, self.activation = cfg.tau, cfg.top_k, cfg.activation
        self.router = ExpertRouter(hidden_size, cfg.router_width, E, f"{prefix}.router")
        self.experts = nn.Module()
        self.experts.w_in = _param(f"{prefix}.experts", "w_in", E, e, hidden_size)
        self.experts.w_up = _param(f"{prefix}.experts", "w_up", E, e, hidden_size) if cfg.gated else None
        self.experts.w_out = _param(f"{prefix}.experts", "w_out", E, e, hidden_size)
        self.experts.b_in = None if cfg.gated else _param(f"{prefix}.experts", "b_in", E, e)
        self.b_out = None if cfg.gated else _param(prefix, "b_out", hidden_size)
        # [tokens seen, token-expert pairs executed, router semaphore], kept on the device by the op.
        self.register_buffer("counters", torch.zeros(COUNTER_SLOTS, dtype=torch.int64), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ex, r = self.experts, self.router
        return torch.ops.d2dmoe.dynamic_k_experts(
            x, r.in_proj.weight, r.out_proj.weight, self.tau, self.top_k, ex.w_in, ex.w_up, ex.w_out, ex.b_in,
            self.b_out, self.activation, self.counters,
        )
