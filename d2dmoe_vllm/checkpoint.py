"""Checkpoint layout and the validator: one home for the tensor names every part of the project uses.

A D2DMoE checkpoint is a directory with ``config.json`` (base ``model_type``, a D2DMoE
``architectures`` entry, a ``d2dmoe`` block) and safetensors weights. Non-expert tensors keep the
base model's Hugging Face names; each expert layer adds the tensors in ``expert_tensor_shapes``.
Only safetensors are read, never pickle, and a config that asks for remote code is rejected.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from d2dmoe_vllm.config import PROJECTIONS, D2DMoEConfig, _fail, projection_family

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def layer_prefix(model_type: str, layer: int) -> str:
    """HF name prefix of a transformer layer."""
    return f"transformer.h.{layer}." if model_type == "gpt2" else f"model.layers.{layer}."


def projection_prefix(model_type: str, layer: int, name: str) -> str:
    """HF name prefix of an attention projection (``...attn.c_attn.``, ``...self_attn.q_proj.``)."""
    return layer_prefix(model_type, layer) + PROJECTIONS[projection_family(model_type)][0] + name + "."


def expert_tensor_shapes(model_type: str, hidden_size: int, cfg: D2DMoEConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every expert-layer tensor (router, experts, shared bias)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for proj in cfg.projections:  # attention projections as experts: non-gated, biased, d_in -> d_out
        for layer, (E, e) in enumerate(zip(proj.num_experts, proj.expert_size)):
            p = projection_prefix(model_type, layer, proj.name)
            shapes.update({p + "router.in_proj.weight": (cfg.router_width, proj.d_in),
                           p + "router.out_proj.weight": (E, cfg.router_width), p + "experts.w_in": (E, e, proj.d_in),
                           p + "experts.b_in": (E, e), p + "experts.w_out": (E, e, proj.d_out), p + "b_out": (proj.d_out,)})
    for layer, (E, e) in enumerate(zip(cfg.num_experts, cfg.expert_size)):
        p = layer_prefix(model_type, layer) + "mlp."
        shapes[p + "router.in_proj.weight"] = (cfg.router_width, hidden_size)
        shapes[p + "router.out_proj.weight"] = (E, cfg.router_width)
        shapes[p + "experts.w_in"] = (E, e, hidden_size)
        if cfg.gated:
            shapes[p + "experts.w_up"] = (E, e, hidden_size)
        else:
            shapes[p + "experts.b_in"] = (E, e)
            shapes[p + "b_out"] = (hidden_size,)
        shapes[p + "experts.w_out"] = (E, e, hidden_size)
    return shapes


def hidden_size_of(hf: dict[str, Any]) -> int:
    return hf.get("hidden_size") or hf["n_embd"]


def read_config(path: str | Path) -> dict[str, Any]:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise _fail(str(cfg_file), "not found", "point at a directory written by d2dmoe-convert")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise _fail(str(cfg_file), f"not valid JSON ({err})", "restore the file or re-export the checkpoint") from err


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only (no tensor data is loaded)."""
    from safetensors import safe_open

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES]
        hint = f" (found {pickles}: pickle files are never loaded)" if pickles else ""
        raise _fail(str(path), f"no *.safetensors weights{hint}", "export the weights as safetensors")
    shapes = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    shapes[name] = tuple(st.get_slice(name).get_shape())
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise _fail(str(f), f"unreadable safetensors file ({err})", "re-export the checkpoint") from err
    return shapes


def validate_config(hf: dict[str, Any]) -> D2DMoEConfig:
    if "auto_map" in hf:
        raise _fail("auto_map", "the checkpoint asks for remote code", "remove auto_map: D2DMoE models never run checkpoint code")
    return D2DMoEConfig.from_hf(hf)


def validate_checkpoint(path: str | Path) -> D2DMoEConfig:
    """Check config and weight shapes of a checkpoint directory; raise CheckpointError naming the fix."""
    hf = read_config(path)
    cfg = validate_config(hf)
    shapes = safetensors_shapes(path)
    expected = expert_tensor_shapes(hf["model_type"], hidden_size_of(hf), cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise _fail(name, "missing from the safetensors files", "re-export the checkpoint with d2dmoe-convert")
        if shapes[name] != shape:
            raise _fail(name, f"has shape {list(shapes[name])}, config.json implies {list(shape)}",
                        "make d2dmoe.num_experts/expert_size/router_width match the weights, or re-export")
    return cfg


def engine_config(model_path: str, hf_config: Any) -> D2DMoEConfig:
    """Config for a model being built inside vLLM: the checkpoint on disk is validated (shapes
    included) when it is a local directory, then the config vLLM holds (with ``hf_overrides``
    such as ``d2dmoe_tau``) is parsed."""
    if Path(model_path).is_dir():
        validate_checkpoint(model_path)
    return validate_config(hf_config.to_dict())
