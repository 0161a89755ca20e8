"""Stage 4b, adapt (optional, not in the paper): fine-tune the sparsified model under its own expert selection.

At 50% of FFN compute most of the quality lost is the experts dropped, not the routers' error (``--oracle``,
docs/converter.md): the model was trained with every neuron running and is then served with half of them
gone. Adapt trains it the way it is served. Each FFN's activation keeps only the neurons of the experts the
frozen router selects for that token at the calibrated tau (or k, or per-layer taus) -- exactly the experts
the checkpoint will run -- and the whole model is fine-tuned, distilled from the original model, with
sparsify's training loop (``sparsify.finetune``: AdamW, warm-up + cosine, resumable states). Routers, split
and tau stay as calibrated: the selection the model learns to live with is the one it is served with
(fine-tuning moves the experts' output norms away from what the routers were trained to predict, but the
routers now decide what runs, not estimate it). The stage's output is the adapted dense model, re-split into
the same experts; its quality and executed fraction are measured again at the same selection.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from d2dmoe_converter.hf_model import activation_attr, decoder_layers
from d2dmoe_converter.sparsify import HoyerActivation, SparsifyOptions
from d2dmoe_kernels.reference import router_scores, select_experts


@dataclass(frozen=True)
class AdaptOptions:
    steps: int = 0            # 0: no adapt stage (the paper's recipe)
    batch: int = 8            # sequences per micro-batch
    accum: int = 1
    seq_len: int = 256
    lr: float = 5e-5
    warmup: int = 20
    clip: float = 1.0
    save_every: int = 50
    distill: float = 1.0      # weight of KL to the original model (the rest: cross-entropy)
    passes: int = 1           # times the training text may be reused

    def training(self) -> SparsifyOptions:
        """The options of sparsify's loop that run this stage: no Hoyer term (which experts run no longer
        depends on the activations' sparsity but on the frozen routers)."""
        return SparsifyOptions(steps=self.steps, batch=self.batch, accum=self.accum, seq_len=self.seq_len, lr=self.lr,
                               warmup=self.warmup, alpha=0.0, clip=self.clip, save_every=self.save_every,
                               distill=self.distill, passes=self.passes)

    @classmethod
    def few_minutes(cls, steps: int) -> AdaptOptions:
        """``steps`` steps sized for a CPU (2 x 256 tokens each; a step 7-8 s for Gemma 3 270M on 2 cores), with
        warm-up and saving in proportion: what ``d2dmoe-demo --adapt-steps`` and ``benchmarks/adapt_cpu.py`` run."""
        return cls(steps=steps, batch=2, seq_len=256, warmup=max(3, steps // 20), save_every=max(10, steps // 3))

    def stage_key(self) -> dict:
        """Every field but how often the training state is saved (it decides no weight)."""
        return {k: v for k, v in asdict(self).items() if k != "save_every"}


def expert_of_neuron(order: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[d_ff] expert index of every neuron of a split (``split.split_ffn``: expert e holds order[e*s:(e+1)*s])."""
    out = torch.empty_like(order)
    out[order] = torch.arange(order.numel(), device=order.device) // (order.numel() // num_experts)
    return out


class SelectedExpertsActivation(HoyerActivation):
    """The FFN's activation (``fn``: the model's own, ReLU after sparsify) with only the selected experts'
    neurons kept. ``select`` (a forward pre-hook on the
    FFN) runs the frozen router on the FFN input, in fp32 like the calibration's reference model, and keeps
    the mask the activation then applies: dropped experts' neurons give 0 and get no gradient."""

    def __init__(self, fn: nn.Module, router: dict[str, torch.Tensor], expert_of_neuron: torch.Tensor, tau: float,
                 top_k: int, reference: str = "max"):
        super().__init__(fn)
        self.router_in = router["router.in_proj.weight"].float()
        self.router_out = router["router.out_proj.weight"].float()
        self.expert_of_neuron, self.tau, self.top_k, self.reference = expert_of_neuron, tau, top_k, reference
        self.keep: torch.Tensor | None = None

    def select(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        with torch.autocast(x.device.type, enabled=False):
            mask = select_experts(router_scores(flat, self.router_in, self.router_out), self.tau, self.top_k,
                                  self.reference)
        self.keep = mask[:, self.expert_of_neuron].reshape(*x.shape[:-1], -1)

    def forward(self, x):
        return super().forward(x) * self.keep.to(x.dtype)


def select_experts_in_ffns_(model: nn.Module, routers: list[dict[str, torch.Tensor]], orders: list[torch.Tensor],
                            num_experts: int, tau: float, top_k: int = 0,
                            layer_tau: tuple[float, ...] | list[float] = (),
                            reference: str = "max") -> list[SelectedExpertsActivation]:
    """Wrap every FFN's activation of ``model`` in its SelectedExpertsActivation, in place, at the
    checkpoint's selection (``layer_tau``, one per layer, replaces ``tau`` as in the plugin; ``reference``:
    what tau is a fraction of)."""
    layers = decoder_layers(model)
    taus = list(layer_tau) or [tau] * len(layers)
    device = next(model.parameters()).device
    acts = []
    for layer, router, order, t in zip(layers, routers, orders, taus, strict=True):
        name = activation_attr(layer.mlp)
        act = SelectedExpertsActivation(getattr(layer.mlp, name), {k: v.to(device) for k, v in router.items()},
                                        expert_of_neuron(order.to(device), num_experts), float(t), top_k, reference)
        setattr(layer.mlp, name, act)
        layer.mlp.register_forward_pre_hook(lambda mod, args, act=act: act.select(args[0]))
        acts.append(act)
    return acts
