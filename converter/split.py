"""Expert split: regroup an FFN's neurons into E equal experts in the checkpoint layout.

A neuron order decides which neurons go together (``kmeans.balanced_kmeans_order``, or
``contiguous_order``); ``split_ffn`` cuts the dense weights along it. Expert e owns rows of the first layer (and of the
up projection) and the matching columns of the second layer; the second-layer bias stays shared.
"""

from __future__ import annotations

import torch

from d2dmoe_converter.dense import DenseModel
from d2dmoe_converter.kmeans import balanced_kmeans_order
from d2dmoe_converter.routers import expert_hidden
from d2dmoe_vllm.checkpoint import layer_prefix


def contiguous_order(d_ff: int) -> torch.Tensor:
    return torch.arange(d_ff)


def coactivation_order(h: torch.Tensor, num_experts: int, seed: int = 0) -> torch.Tensor:
    """Neurons that are large on the same tokens go together: balanced k-means on each neuron's profile
    |h_j| over sampled tokens (``h`` [tokens, d_ff], what the second layer reads), whose cosine is how
    often and how strongly two neurons fire together. Then a token's few large activations fall in few
    experts, and dropping the others loses less than with a split by weights (benchmarks/split_study.py)."""
    return balanced_kmeans_order(h.abs().t(), num_experts, seed=seed)


def dense_ffn(dense: DenseModel, layer: int) -> dict[str, torch.Tensor | None]:
    """The layer's FFN as (w_in [d_ff, d], w_up [d_ff, d] | None, w_out [d_ff, d], b_in, b_out)."""
    p = layer_prefix(dense.model_type, layer) + "mlp."
    s = dense.state
    if dense.model_type == "gpt2":  # Conv1D stores x @ W, i.e. W is [in, out]
        return {"w_in": s[p + "c_fc.weight"].t(), "w_up": None, "w_out": s[p + "c_proj.weight"],
                "b_in": s[p + "c_fc.bias"], "b_out": s[p + "c_proj.bias"]}
    return {"w_in": s[p + "gate_proj.weight"], "w_up": s[p + "up_proj.weight"], "w_out": s[p + "down_proj.weight"].t(),
            "b_in": None, "b_out": None}


def dense_hidden(x: torch.Tensor, ffn: dict[str, torch.Tensor | None], activation: str) -> torch.Tensor:
    """[tokens, d_ff]: the FFN's hidden activations (after act, and the gate's product for Gemma)."""
    one = {f"experts.{k}": None if ffn[k] is None else ffn[k][None] for k in ("w_in", "w_up", "b_in")}
    return expert_hidden(x, one, activation)[:, 0]


def dense_ffn_names(dense: DenseModel, layer: int) -> list[str]:
    p = layer_prefix(dense.model_type, layer) + "mlp."
    if dense.model_type == "gpt2":
        return [p + n for n in ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")]
    return [p + n for n in ("gate_proj.weight", "up_proj.weight", "down_proj.weight")]


def split_ffn(ffn: dict[str, torch.Tensor | None], order: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """Expert tensors (names relative to ``...mlp.``) for neurons taken in ``order`` (``w_out`` is
    [d_ff, d_out]; d_out may differ from d for attention-projection MLPs)."""
    d_ff, d = ffn["w_in"].shape
    e = d_ff // num_experts
    out = {
        "experts.w_in": ffn["w_in"][order].reshape(num_experts, e, d),
        "experts.w_out": ffn["w_out"][order].reshape(num_experts, e, ffn["w_out"].shape[1]),
    }
    if ffn["w_up"] is not None:
        out["experts.w_up"] = ffn["w_up"][order].reshape(num_experts, e, d)
    if ffn["b_in"] is not None:
        out["experts.b_in"] = ffn["b_in"][order].reshape(num_experts, e)
    if ffn["b_out"] is not None:
        out["b_out"] = ffn["b_out"]
    return {k: v.contiguous() for k, v in out.items()}
