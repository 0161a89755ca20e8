"""A D2DMoE model in plain torch: the Hugging Face dense model with each FFN replaced by router +
selection + the masked all-experts reference (``d2dmoe_kernels.reference``), counting the
token-expert pairs it executes. The converter measures with it (calibration, held-out perplexity);
the tests use it as the model-level reference vLLM must match.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from d2dmoe_converter.hf_model import base_model, decoder_layers
from d2dmoe_converter.routers import router_targets
from d2dmoe_kernels.reference import dynamic_k_experts_reference, pair_macs, router_scores, select_experts
from d2dmoe_vllm.checkpoint import layer_prefix, projection_prefix
from d2dmoe_vllm.config import PROJECTION_ACTIVATION, PROJECTIONS, projection_family

EXPERT_TENSORS = ("router.in_proj.weight", "router.out_proj.weight", "experts.w_in", "experts.w_up", "experts.w_out",
                  "experts.b_in", "b_out")


class ReferenceMoEMLP(nn.Module):
    """One expert layer; ``tau``/``top_k`` may be changed between forwards. ``oracle`` (a diagnostic):
    select on every expert's true output norm, what the router is trained to predict, instead of
    the router's prediction -- the method's limit without the router's error. ``reference``: what tau is
    a fraction of (``selection_rule``), the checkpoint's ``d2dmoe.reference``."""

    def __init__(self, tensors: dict[str, torch.Tensor | None], tau: float, top_k: int, activation: str,
                 module: str = "mlp", reference: str = "max"):
        super().__init__()
        self.t, self.module, self.reference = tensors, module, reference
        self.tau, self.top_k, self.activation = tau, top_k, activation
        self.tokens = self.pairs = 0
        self.per_token = []   # experts executed by each token, when ``record`` is on
        self.record = False
        self.oracle = False
        self.counted: torch.Tensor | None = None  # [tokens] bool: the rows the counters see (None: all; ``counting``)

    # The counters stay on the device until read: an int() or .cpu() per layer per forward would stall
    # the host twice a layer. Setting one (to 0) resets it.
    @property
    def tokens(self) -> int:
        return int(self._tokens)

    @tokens.setter
    def tokens(self, value: int) -> None:
        self._tokens = value

    @property
    def pairs(self) -> int:
        return int(self._pairs)

    @pairs.setter
    def pairs(self, value: int) -> None:
        self._pairs = value

    @property
    def per_token(self) -> list[torch.Tensor]:
        """Experts executed by each counted token, one CPU tensor per recorded forward."""
        return [k[k >= 0].cpu() for k in self._per_token]

    @per_token.setter
    def per_token(self, value: list) -> None:
        self._per_token = list(value)

    @property
    def num_experts(self) -> int:
        return self.t["experts.w_in"].shape[0]

    @property
    def fraction(self) -> float:
        """Executed share of this layer's token-expert pairs since the counters were reset."""
        return self.pairs / max(1, self.tokens * self.num_experts)

    @property
    def flops_per_pair(self) -> int:
        """Multiply-adds of one expert on one token."""
        return pair_macs(self.t["experts.w_in"], self.t["experts.w_up"], self.t["experts.w_out"])

    def select(self, flat: torch.Tensor) -> torch.Tensor:
        """[T, E] bool: the experts each token of ``flat`` [T, d] runs under the layer's selection (no counting)."""
        t = self.t
        if self.oracle:
            scores = router_targets(flat, t, self.activation, "d2dmoe")
        else:
            scores = router_scores(flat, t["router.in_proj.weight"].to(flat.dtype),
                                   t["router.out_proj.weight"].to(flat.dtype))
        return select_experts(scores, self.tau, self.top_k, self.reference)

    def forward(self, x, *args, **kwargs):
        t = self.t
        flat = x.reshape(-1, x.shape[-1])
        mask = self.select(flat)
        k = mask.sum(-1)   # experts per token
        if self.counted is None:
            self._tokens = self._tokens + k.shape[0]
        else:              # padding: not counted, and -1 in the record
            k = k.masked_fill(~self.counted, -1)
            self._tokens = self._tokens + self.counted.sum()
        self._pairs = self._pairs + k.clamp(min=0).sum()
        if self.record:
            self._per_token.append(k)
        out = dynamic_k_experts_reference(flat, mask, t["experts.w_in"], t["experts.w_up"], t["experts.w_out"],
                                          t["experts.b_in"], t["b_out"], self.activation)
        return out.reshape(*x.shape[:-1], out.shape[-1])


def attach_experts(model: nn.Module, state: dict[str, torch.Tensor], model_type: str, activation: str,
                   tau: float = 0.0, top_k: int = 0, reference: str = "max") -> list[ReferenceMoEMLP]:
    """Replace every FFN of ``model`` (in place) by its expert layer from a D2DMoE state dict, and
    every attention projection the state holds experts for (ReLU, biased) by its expert layer; all of them
    select against ``reference``."""
    device = next(model.parameters()).device
    attn_attr, names = PROJECTIONS[projection_family(model_type)]

    def tensors(p: str) -> dict:
        return {k: (state[p + k].to(device=device, dtype=torch.float32) if p + k in state else None)
                for k in EXPERT_TENSORS}

    mlps = []
    for i, layer in enumerate(decoder_layers(model)):
        layer.mlp = ReferenceMoEMLP(tensors(layer_prefix(model_type, i) + "mlp."), tau, top_k, activation,
                                    reference=reference)
        mlps.append(layer.mlp)
        attn = getattr(layer, attn_attr.rstrip("."))
        for name in names:
            p = projection_prefix(model_type, i, name)
            if p + "experts.w_in" in state:
                setattr(attn, name, ReferenceMoEMLP(tensors(p), tau, top_k, PROJECTION_ACTIVATION, module=name,
                                                    reference=reference))
    return mlps


def expert_layers(model: nn.Module) -> list[ReferenceMoEMLP]:
    """Every expert layer: FFNs and attention projections."""
    return [m for m in model.modules() if isinstance(m, ReferenceMoEMLP)]


def ffn_layers(model: nn.Module) -> list[ReferenceMoEMLP]:
    return [m for m in expert_layers(model) if m.module == "mlp"]


def projection_layers(model: nn.Module) -> list[ReferenceMoEMLP]:
    return [m for m in expert_layers(model) if m.module != "mlp"]


@contextmanager
def counting(model: nn.Module, rows: torch.Tensor):
    """Within it, the expert layers count only the tokens where ``rows`` (bool, one per token of the
    forward's [batch, seq] flattened) is true: padding run to batch sequences is not executed compute."""
    layers = expert_layers(model)
    for m in layers:
        m.counted = rows.reshape(-1)
    try:
        yield
    finally:
        for m in layers:
            m.counted = None


def set_selection(model: nn.Module, tau: float = 0.0, top_k: int = 0, oracle: bool = False,
                  layer_tau: tuple[float, ...] | list[float] = ()) -> None:
    """Selection of every expert layer, counters reset; ``layer_tau`` (one per layer) replaces ``tau``
    for the FFNs, as a checkpoint's ``d2dmoe.layer_tau`` does in the plugin."""
    for m in expert_layers(model):
        m.tau, m.top_k, m.oracle = tau, top_k, oracle
        m.tokens = m.pairs = 0
    if layer_tau:
        for m, t in zip(ffn_layers(model), layer_tau, strict=True):
            m.tau = float(t)


def ffn_fraction(model: nn.Module) -> float:
    """Executed expert compute / dense FFN compute over everything run since ``set_selection``
    (experts of one layer cost the same; layers are weighted by their expert size)."""
    done = sum(m.pairs * m.t["experts.w_in"].shape[1] for m in ffn_layers(model))
    full = sum(m.tokens * m.num_experts * m.t["experts.w_in"].shape[1] for m in ffn_layers(model))
    return done / full if full else float("nan")


def projection_fraction(model: nn.Module) -> float | None:
    """Executed / full compute of the attention-projection experts (FLOP-weighted); None without them."""
    layers = projection_layers(model)
    full = sum(m.tokens * m.num_experts * m.flops_per_pair for m in layers)
    return sum(m.pairs * m.flops_per_pair for m in layers) / full if full else None


@torch.no_grad()
def run_base(model: nn.Module, seqs: torch.Tensor, batch: int = 8) -> None:
    """Run the transformer (no LM head) over ``seqs`` [N, S]: enough to count executed experts."""
    device = next(model.parameters()).device
    for i in range(0, len(seqs), batch):
        base_model(model)(input_ids=seqs[i : i + batch].to(device))


@torch.no_grad()
def perplexity(model: nn.Module, seqs: torch.Tensor, batch: int = 4, desc: str | None = None) -> float:
    """exp(mean next-token NLL) over ``seqs`` [N, S] (every position but the first is predicted)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(seqs), batch), desc=desc, disable=desc is None, leave=False):
        ids = seqs[i : i + batch].to(device)
        logits = model(input_ids=ids).logits  # fp32: quality numbers are not bent by bf16 rounding
        lp = torch.log_softmax(logits[:, :-1].float(), -1)
        nll -= lp.gather(-1, ids[:, 1:, None]).sum().item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
