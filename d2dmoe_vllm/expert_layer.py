"""The one new idea in our model files: an FFN (or an attention projection) run as dynamic-k experts.

``ExpertRouter`` holds the router's weights (Linear -> ReLU -> Linear -> abs, predicting each
expert's output norm); the opaque op ``torch.ops.d2dmoe.dynamic_k_experts`` runs the router,
selects experts (R_e >= tau * max R) and computes only those. Parameter names match the checkpoint
(see ``checkpoint.expert_tensor_shapes``).
"""

from __future__ import annotations

import torch
from torch import nn

from d2dmoe_kernels.layout import stack_up_weights, stacked_up_view
from d2dmoe_kernels.op import COUNTER_SLOTS
from d2dmoe_kernels.reference import pair_macs
from d2dmoe_vllm.config import PROJECTION_ACTIVATION, CheckpointError, D2DMoEConfig, ProjectionExperts


def checked_weight_loader(name: str, full_shape: tuple[int, ...], shard: tuple[int, int] | None = None):
    """A vLLM weight_loader that names the tensor and both shapes when they disagree, and keeps
    experts [start, start + n) of it when ``shard`` is given (tensor parallelism)."""

    def load(param: torch.Tensor, loaded: torch.Tensor) -> None:
        if tuple(loaded.shape) != full_shape:
            raise CheckpointError(
                f"D2DMoE checkpoint: {name}: has shape {list(loaded.shape)}, config.json implies "
                f"{list(full_shape)}. Fix: make d2dmoe.num_experts/expert_size/router_width match the weights"
            )
        param.data.copy_(loaded if shard is None else loaded.narrow(0, *shard))

    return load


def _param(prefix: str, name: str, *shape: int, shard: tuple[int, int] | None = None,
           storage: torch.Tensor | None = None) -> nn.Parameter:
    """A parameter loaded by name; ``storage``: the (local-shape) tensor it wraps, else a new one."""
    local = shape if shard is None else (shard[1], *shape[1:])
    p = nn.Parameter(torch.empty(*local) if storage is None else storage, requires_grad=False)
    p.weight_loader = checked_weight_loader(f"{prefix}.{name}", tuple(shape), shard)
    return p


class ExpertRouter(nn.Module):
    """Regression router weights: R = |out_proj(relu(in_proj x))| predicts ||expert_e(x)||_2; the
    op computes it (``d2dmoe_kernels.reference.router_scores`` on the CPU)."""

    def __init__(self, hidden_size: int, width: int, num_experts: int, prefix: str,
                 in_proj: torch.Tensor | None = None):
        super().__init__()
        self.in_proj = nn.Module()
        self.in_proj.weight = _param(f"{prefix}.in_proj", "weight", width, hidden_size, storage=in_proj)
        self.out_proj = nn.Module()
        self.out_proj.weight = _param(f"{prefix}.out_proj", "weight", num_experts, width)


class DynamicKMLP(nn.Module):
    """Drop-in replacement for a dense FFN (plain GPT-2 style or gated Gemma style), or, given
    ``projection``, for an attention projection replaced by a ReLU MLP (``d_in -> d_out``, biased).

    Under tensor parallelism each rank holds E / tp whole experts and the full router; the ranks'
    partial sums meet in one all-reduce, as in vLLM's row-parallel layers (b_out is added once)."""

    def __init__(self, cfg: D2DMoEConfig, layer: int, hidden_size: int, prefix: str,
                 tp_rank: int | None = None, tp_size: int | None = None, projection: ProjectionExperts | None = None):
        super().__init__()
        if tp_size is None:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

            tp_rank, tp_size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        if projection is None:
            E, e, d_in, d_out = cfg.num_experts[layer], cfg.expert_size[layer], hidden_size, hidden_size
            gated, activation, biases = cfg.gated, cfg.activation, not cfg.gated
        else:
            E, e, d_in, d_out = projection.num_experts[layer], projection.expert_size[layer], projection.d_in, projection.d_out
            gated, activation, biases = False, PROJECTION_ACTIVATION, True
            if tp_size > 1:
                raise CheckpointError(
                    f"D2DMoE checkpoint: {prefix}: attention-projection experts are served with "
                    f"tensor_parallel_size=1 only (got {tp_size}). Fix: serve with tensor_parallel_size=1, or "
                    "re-convert without --attention-experts"
                )
        self.module = "mlp" if projection is None else projection.name
        if E % tp_size:
            raise CheckpointError(
                f"D2DMoE checkpoint: {prefix}: {E} experts cannot be split over tensor_parallel_size={tp_size}. "
                f"Fix: serve with a tensor_parallel_size that divides {E}, or re-convert with a matching expert count"
            )
        shard = (tp_rank * (E // tp_size), E // tp_size)
        self.layer, self.tp_rank, self.tp_size, self.expert_offset = layer, tp_rank, tp_size, shard[0]
        self.num_experts, self.expert_size = E, e
        self.tau = cfg.mlp_tau(layer) if projection is None else cfg.tau
        self.top_k, self.activation, self.reference = cfg.top_k, activation, cfg.reference
        # w_in, w_up and the router's first layer back to back in one buffer: on the GPU one cuBLAS
        # GEMM computes them together (d2dmoe_kernels.layout, expert_masked_gemm).
        w_in, w_up, router_in = stack_up_weights(shard[1], e, d_in, cfg.router_width, gated)
        self.router = ExpertRouter(d_in, cfg.router_width, E, f"{prefix}.router", in_proj=router_in)
        self.experts = nn.Module()
        self.experts.w_in = _param(f"{prefix}.experts", "w_in", E, e, d_in, shard=shard, storage=w_in)
        self.experts.w_up = _param(f"{prefix}.experts", "w_up", E, e, d_in, shard=shard, storage=w_up) if gated else None
        self.experts.w_out = _param(f"{prefix}.experts", "w_out", E, e, d_out, shard=shard)
        self.experts.b_in = _param(f"{prefix}.experts", "b_in", E, e, shard=shard) if biases else None
        self.b_out = _param(prefix, "b_out", d_out) if biases else None
        self.add_b_out = tp_rank == 0
        # [tokens seen, token-expert pairs executed, router semaphore], kept on the device by the op.
        self.register_buffer("counters", torch.zeros(COUNTER_SLOTS, dtype=torch.int64), persistent=False)

    def local_forward(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's experts (all of them when tp = 1), plus b_out on rank 0."""
        ex, r = self.experts, self.router
        return torch.ops.d2dmoe.dynamic_k_experts(
            x, r.in_proj.weight, r.out_proj.weight, self.tau, self.top_k, self.expert_offset, ex.w_in, ex.w_up,
            ex.w_out, ex.b_in, self.b_out if self.add_b_out else None, self.activation, self.counters, self.reference,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.local_forward(x)
        if self.tp_size > 1:
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(out)
        return out

    @property
    def stacked(self) -> bool:
        """Whether w_in, w_up and the router's first layer still lie in one buffer after loading
        (the GPU's cuBLAS-GEMM path needs it; other paths do not)."""
        return stacked_up_view(self.experts.w_in, self.experts.w_up, self.router.in_proj.weight) is not None

    @property
    def flops_per_pair(self) -> int:
        """Multiply-adds of one expert on one token (what a token-expert pair costs)."""
        return pair_macs(self.experts.w_in, self.experts.w_up, self.experts.w_out)


class ExpertLinear(DynamicKMLP):
    """An attention projection as experts behind vLLM's Linear interface (returns ``(output, None)``)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


class ExpertQKV(nn.Module):
    """Gemma's q, k and v projections as three expert layers behind vLLM's fused ``qkv_proj``
    interface: their outputs are concatenated as the fused linear's are."""

    def __init__(self, q_proj: DynamicKMLP, k_proj: DynamicKMLP, v_proj: DynamicKMLP):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = q_proj, k_proj, v_proj

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1), None


def attach_projection_experts(attn: nn.Module, cfg: D2DMoEConfig, layer: int, model_type: str, prefix: str) -> None:
    """Replace the attention module's projections listed in ``cfg.projections`` by expert layers
    (GPT-2: ``c_attn`` fused q/k/v and ``c_proj``; Gemma: ``q_proj``/``k_proj``/``v_proj`` behind
    ``qkv_proj``, and ``o_proj``)."""
    def expert(name: str, cls=DynamicKMLP) -> DynamicKMLP:
        return cls(cfg, layer, 0, f"{prefix}.{name}", projection=cfg.projection(name))

    names = {p.name for p in cfg.projections}
    if model_type == "gpt2":
        for name in names:  # c_attn, c_proj
            setattr(attn, name, expert(name, ExpertLinear))
        return
    if {"q_proj", "k_proj", "v_proj"} & names:
        attn.qkv_proj = ExpertQKV(expert("q_proj"), expert("k_proj"), expert("v_proj"))
    if "o_proj" in names:
        attn.o_proj = expert("o_proj", ExpertLinear)
