"""A Gemma-2B-shaped model with random weights, dense and as a D2DMoE checkpoint with synthetic routing.

No Gemma-2B weights exist in any registry here, so the serving and tensor-parallel benchmarks use
this: Gemma-2B's shapes (d 2048, d_ff 16384 gated GELU-tanh, 18 layers, 8 query heads, 1 KV head of
256, vocabulary 256000, tied embeddings), random weights, and random routers. The routing is
synthetic: a router of random Gaussian weights gives every expert the same score distribution, and
R = |W2 ReLU(W1 x)| is positively homogeneous, so the executed fraction at a given tau barely depends
on the hidden states; ``tau_for_fraction`` picks tau for a target fraction on Gaussian inputs and the
engine's compute report states what was executed. The expert split is the conversion's own
(``split_ffn``, contiguous order) and the checkpoint is the converter's export format.

    python benchmarks/synthetic_gemma2b.py OUT_DIR [--expert-size 256]   # writes OUT_DIR/dense, OUT_DIR/d2dmoe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from d2dmoe_converter.convert import ConvertOptions, export_config, export_state, moe_config
from d2dmoe_converter.dense import DenseModel
from d2dmoe_converter.routers import RouterOptions, router_forward
from d2dmoe_converter.split import contiguous_order, dense_ffn, split_ffn
from d2dmoe_vllm.checkpoint import validate_checkpoint

GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"], "model_type": "gemma", "hidden_size": 2048, "intermediate_size": 16384,
    "num_hidden_layers": 18, "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
    "vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": True,
    "attention_bias": False, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0, "dtype": "bfloat16",
}
ROUTER_WIDTH = 128
SMALL = {"hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 4, "num_attention_heads": 4,
         "head_dim": 64, "vocab_size": 8192}  # the same recipe at CPU size (bench_serve.py --synthetic-small)


def dense_state(cfg: dict, seed: int = 0, device: str | None = None) -> dict[str, torch.Tensor]:
    """Unit-gain random weights (std 1/sqrt(fan_in)), embeddings large enough that greedy tokens are
    decided by clear margins, so bf16 rounding rarely flips them."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator(device).manual_seed(seed)
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd

    def w(out_f, in_f, scale=1.0):
        return (torch.randn(out_f, in_f, generator=g, device=device) * (scale / in_f**0.5)).to(torch.bfloat16).cpu()

    state = {"model.embed_tokens.weight": w(cfg["vocab_size"], d, 3.0), "model.norm.weight": w(1, d, 0.1 * d**0.5)[0]}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": w(q, d), p + "self_attn.k_proj.weight": w(kv, d),
            p + "self_attn.v_proj.weight": w(kv, d), p + "self_attn.o_proj.weight": w(d, q),
            p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": w(1, d, 0.1 * d**0.5)[0],
            p + "post_attention_layernorm.weight": w(1, d, 0.1 * d**0.5)[0],
        })
    return state


def random_router(hidden: int, num_experts: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"router.in_proj.weight": torch.randn(ROUTER_WIDTH, hidden, generator=gen) / hidden**0.5,
            "router.out_proj.weight": torch.randn(num_experts, ROUTER_WIDTH, generator=gen) / ROUTER_WIDTH**0.5}


def executed_fraction(router: dict[str, torch.Tensor], tau: float, tokens: int = 8192, seed: int = 1) -> float:
    x = torch.randn(tokens, router["router.in_proj.weight"].shape[1], generator=torch.Generator().manual_seed(seed))
    r = router_forward(x, router["router.in_proj.weight"], router["router.out_proj.weight"])
    return (r >= tau * r.amax(-1, keepdim=True)).float().mean().item()


def tau_for_fraction(router: dict[str, torch.Tensor], fraction: float, iterations: int = 30) -> float:
    """Bisection: the executed fraction falls as tau rises."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if executed_fraction(router, mid) > fraction else (lo, mid)
    return (lo + hi) / 2


def write(out: Path, expert_size: int = 256, fractions=(0.1, 0.3, 0.5), seed: int = 0, **shape) -> dict:
    """OUT/dense and OUT/d2dmoe (tau = 0 in config.json); returns {fraction: tau} for hf_overrides.
    ``shape`` overrides config fields (a small model for a CPU run)."""
    cfg = {**GEMMA_2B, **shape}
    dense = DenseModel(config=cfg, state=dense_state(cfg, seed), source=None)
    (out / "dense").mkdir(parents=True, exist_ok=True)
    save_file(dense.state, str(out / "dense" / "model.safetensors"), metadata={"format": "pt"})
    (out / "dense" / "config.json").write_text(json.dumps(cfg, indent=2))

    opts = ConvertOptions(expert_size=expert_size, routers=RouterOptions(width=ROUTER_WIDTH))
    moe = moe_config(dense, opts)
    gen = torch.Generator().manual_seed(seed + 1)
    experts = [split_ffn(dense_ffn(dense, i), contiguous_order(dense.d_ff), moe.num_experts[i])
               for i in range(dense.num_layers)]
    routers = [random_router(dense.hidden_size, moe.num_experts[i], gen) for i in range(dense.num_layers)]
    (out / "d2dmoe").mkdir(parents=True, exist_ok=True)
    save_file(export_state(dense, experts, routers, "bfloat16"), str(out / "d2dmoe" / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "d2dmoe" / "config.json").write_text(json.dumps(export_config(dense, moe, torch.bfloat16), indent=2))
    validate_checkpoint(out / "d2dmoe")
    taus = {f: round(tau_for_fraction(routers[0], f), 4) for f in fractions}
    (out / "taus.json").write_text(json.dumps({str(f): t for f, t in taus.items()}))
    return taus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--expert-size", type=int, default=256)
    args = ap.parse_args()
    print(write(args.out, args.expert_size))


if __name__ == "__main__":
    main()
