"""Conversion driver: dense checkpoint -> D2DMoE checkpoint.

Stages so far: load -> (ReLU-fication) -> split (balanced k-means) -> router init -> export. Training stages
(sparsity fine-tuning, router training, tau calibration) slot in between split and export.
The output directory appears only when everything succeeded: the checkpoint is staged beside
it, validated by the plugin's own validator, then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from d2dmoe_converter.dense import DenseModel, load_dense
from d2dmoe_converter.kmeans import balanced_kmeans_order
from d2dmoe_converter.split import contiguous_order, dense_ffn, dense_ffn_names, split_ffn
from d2dmoe_vllm.checkpoint import layer_prefix, validate_checkpoint
from d2dmoe_vllm.config import ARCHITECTURES, FORMAT_VERSION, CheckpointError, D2DMoEConfig, check_tau

SPLITS = ("kmeans", "contiguous")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh"}


@dataclass(frozen=True)
class ConvertOptions:
    expert_size: int | None = None   # neurons per expert; default: d_ff / 32 experts
    num_experts: int | None = None
    relufy: bool = False             # replace the FFN activation (GPT-2) / gate activation (Gemma) by ReLU
    split: str = "kmeans"            # "kmeans" (balanced, on normalised first-layer rows) or "contiguous"
    tau: float = 0.0
    router_width: int = 128
    dtype: str = "auto"
    seed: int = 0
    overwrite: bool = False


def dense_activation(dense: DenseModel) -> str:
    cfg = dense.config
    if dense.model_type == "gpt2":
        name = cfg.get("activation_function", "gelu_new")
    else:  # Gemma's GeGLU uses the tanh approximation whatever hidden_act says (as HF and vLLM do)
        name = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if name not in _HF_ACTIVATIONS:
        raise CheckpointError(f"dense checkpoint: activation {name!r} is not supported. "
                              f"Fix: use a model with one of {sorted(_HF_ACTIVATIONS)}, or convert with --relu")
    return _HF_ACTIVATIONS[name]


def expert_counts(d_ff: int, opts: ConvertOptions) -> tuple[int, int]:
    if opts.expert_size and opts.num_experts:
        raise ValueError("give --expert-size or --num-experts, not both")
    size = opts.expert_size or (d_ff // opts.num_experts if opts.num_experts else d_ff // 32)
    if size <= 0 or d_ff % size or (opts.num_experts and size * opts.num_experts != d_ff):
        raise ValueError(f"expert size {size} does not divide the FFN width d_ff = {d_ff}; "
                         f"pick a divisor of {d_ff}")
    return d_ff // size, size


def moe_config(dense: DenseModel, opts: ConvertOptions) -> D2DMoEConfig:
    E, e = expert_counts(dense.d_ff, opts)
    if opts.router_width <= 0:
        raise ValueError(f"--router-width must be positive, got {opts.router_width}")
    L = dense.num_layers
    return D2DMoEConfig(
        format_version=FORMAT_VERSION, tau=check_tau(opts.tau, "--tau"), top_k=0,
        activation="relu" if opts.relufy else dense_activation(dense), gated=dense.model_type != "gpt2",
        expert_modules=("mlp",), d_ff=dense.d_ff, num_experts=(E,) * L, expert_size=(e,) * L,
        router_width=opts.router_width,
    )


def init_router(hidden: int, width: int, num_experts: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Untrained router (Kaiming-uniform like nn.Linear); the routers stage trains it."""
    def linear(out_f, in_f):
        bound = in_f ** -0.5
        return (torch.rand(out_f, in_f, generator=gen) * 2 - 1) * bound
    return {"router.in_proj.weight": linear(width, hidden), "router.out_proj.weight": linear(num_experts, width)}


def build_state(dense: DenseModel, cfg: D2DMoEConfig, opts: ConvertOptions) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(opts.seed)
    state = dict(dense.state)
    for layer in tqdm(range(dense.num_layers), desc="split FFNs into experts"):
        ffn = dense_ffn(dense, layer)
        for name in dense_ffn_names(dense, layer):
            del state[name]
        p = layer_prefix(dense.model_type, layer) + "mlp."
        if opts.split == "kmeans":
            order = balanced_kmeans_order(ffn["w_in"], cfg.num_experts[layer], seed=opts.seed + layer)
        else:
            order = contiguous_order(cfg.d_ff)
        experts = split_ffn(ffn, order, cfg.num_experts[layer])
        router = init_router(dense.hidden_size, cfg.router_width, cfg.num_experts[layer], gen)
        state.update({p + k: v for k, v in {**experts, **router}.items()})
    dtype = DTYPES[opts.dtype]
    if dtype is None:
        dtype = next(v.dtype for k, v in dense.state.items() if v.is_floating_point())
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def export_config(dense: DenseModel, cfg: D2DMoEConfig, dtype: torch.dtype) -> dict:
    hf = {k: v for k, v in dense.config.items() if k not in ("auto_map", "quantization_config", "_name_or_path")}
    hf["architectures"] = [next(a for a, (t, _) in ARCHITECTURES.items() if t == dense.model_type)]
    hf.pop("torch_dtype", None)
    hf["dtype"] = str(dtype).removeprefix("torch.")
    if cfg.activation == "relu":  # keep the base config truthful about the FFN activation
        if dense.model_type == "gpt2":
            hf["activation_function"] = "relu"
        else:
            hf["hidden_activation"] = hf["hidden_act"] = "relu"
    hf["d2dmoe"] = cfg.to_dict()
    return hf


def convert(src: str | Path, dst: str | Path, opts: ConvertOptions = ConvertOptions()) -> dict:
    """Convert ``src`` (HF dir or .gguf) into the D2DMoE checkpoint directory ``dst``; returns a report."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()) and not opts.overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose another output or pass --overwrite")
    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype {opts.dtype!r}: use one of {list(DTYPES)}")
    if opts.split not in SPLITS:
        raise ValueError(f"--split {opts.split!r}: use one of {list(SPLITS)}")
    t0 = time.time()
    dense = load_dense(src)
    cfg = moe_config(dense, opts)
    state = build_state(dense, cfg, opts)
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    stage = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
        (stage / "config.json").write_text(json.dumps(export_config(dense, cfg, dtype), indent=2))
        dense.save_tokenizer(stage)
        validate_checkpoint(stage)
        if dst.exists():
            shutil.rmtree(dst)
        stage.rename(dst)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {
        "output": str(dst),
        "model_type": dense.model_type,
        "layers": dense.num_layers,
        "experts_per_layer": cfg.num_experts[0],
        "expert_size": cfg.expert_size[0],
        "split": opts.split,
        "activation": cfg.activation,
        "tau": cfg.tau,
        "parameters": sum(v.numel() for v in state.values()),
        "seconds": round(time.time() - t0, 1),
    }
