"""Plain-torch reference of the dynamic-k expert layer: selection, then every expert computed and masked.

This is the definition the fast paths are tested against; it is never the serving path.
Expert layout (one home for it, shared by checkpoint, plugin and kernels):

    w_in  [E, e, d_in]   first layer rows (GPT-2 ``c_fc``, Gemma ``gate_proj``)
    w_up  [E, e, d_in]   Gemma ``up_proj`` rows, or None for plain (non-gated) experts
    w_out [E, e, d_out]  second layer, stored transposed so one expert's rows are contiguous
    b_in  [E, e]         first-layer bias (GPT-2) or None
    b_out [d_out]        second-layer bias, shared: added once whatever the routing

x is [T, d_in], the output [T, d_out]; d_out = w_out.shape[2] equals d_in for an FFN and differs
for expert layers that replace attention projections (e.g. q: 640 -> 1024). The router reads x:
[w, d_in] and [E, w].

    expert_e(x) = w_out[e]^T (act(w_in[e] x + b_in[e]) * (w_up[e] x))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(h)
    if activation == "gelu":
        return F.gelu(h)
    if activation == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    raise ValueError(f"unknown expert activation {activation!r}; expected one of {ACTIVATIONS}")


def pair_macs(w_in: torch.Tensor, w_up: torch.Tensor | None, w_out: torch.Tensor) -> int:
    """Multiply-adds of one expert on one token (what a token-expert pair costs), from the expert
    weights' shapes: e (d_in (2 if gated else 1) + d_out)."""
    _, e, d_in = w_in.shape
    return e * (d_in * (1 if w_up is None else 2) + w_out.shape[2])


def router_scores(x: torch.Tensor, router_in: torch.Tensor, router_out: torch.Tensor) -> torch.Tensor:
    """Regression router: R = |W_out relu(W_in x)|, the predicted norm of every expert's output."""
    return F.linear(F.relu(F.linear(x, router_in)), router_out).abs()


REFERENCES = ("max", "sum")  # what dynamic-k's tau is a fraction of (``selection_rule``)


def selection_rule(scores: torch.Tensor, tau: float, top_k: int = 0, reference: str = "max") -> tuple[torch.Tensor, float]:
    """(per-token reference value [T] in fp32, factor): expert e runs iff R_e >= factor * reference.

    Dynamic-k (top_k == 0) with ``reference`` "max" (the paper's): reference = max_e R_e, factor = tau, so
    tau = 0 runs every expert and the arg-max expert always runs. With "sum": expert e runs iff
    R_e >= tau * sum_e R_e or it is the arg-max, i.e. reference = min(tau * sum_e R_e, max_e R_e), factor = 1;
    at the same compute it keeps more of each token's output (docs/converter.md, "What tau is a fraction
    of"). Top-k (top_k > 0, the MoEfication baseline): reference = the k-th largest score, factor = 1
    (experts tied with the k-th also run). Every implementation (reference, CPU, Triton) selects through
    this one rule, in fp32.
    """
    s = scores.float()
    if top_k > 0:
        return s.topk(min(top_k, s.shape[-1]), dim=-1).values[:, -1].contiguous(), 1.0
    if reference == "sum":
        return torch.minimum(float(tau) * s.sum(dim=-1), s.amax(dim=-1)), 1.0
    if reference != "max":
        raise ValueError(f"selection reference {reference!r}: not one of {REFERENCES}")
    return s.amax(dim=-1), float(tau)


def select_experts(scores: torch.Tensor, tau: float, top_k: int = 0, reference: str = "max") -> torch.Tensor:
    """Boolean [T, E] mask of the experts each token runs (see ``selection_rule``)."""
    ref, factor = selection_rule(scores, tau, top_k, reference)
    return scores.float() >= factor * ref[:, None]


def dynamic_k_experts_reference(
    x: torch.Tensor,
    mask: torch.Tensor,
    w_in: torch.Tensor,
    w_up: torch.Tensor | None,
    w_out: torch.Tensor,
    b_in: torch.Tensor | None,
    b_out: torch.Tensor | None,
    activation: str,
) -> torch.Tensor:
    """Sum of the selected experts' outputs plus the shared bias, computing all experts (fp32 inside)."""
    E, e, d = w_in.shape
    d_out = w_out.shape[2]
    xf = x.float()
    h = xf @ w_in.float().reshape(E * e, d).t()
    if b_in is not None:
        h = h + b_in.float().reshape(E * e)
    h = apply_activation(h, activation)
    if w_up is not None:
        h = h * (xf @ w_up.float().reshape(E * e, d).t())
    h = h.reshape(-1, E, e) * mask.reshape(-1, E, 1).float()
    out = h.reshape(-1, E * e) @ w_out.float().reshape(E * e, d_out)
    if b_out is not None:
        out = out + b_out.float()
    return out.to(x.dtype)
