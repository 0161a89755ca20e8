"""Stage 'attention' (optional, METHOD step 5): attention projections as dynamic-k experts.

Each selected projection (Gemma ``q_proj``/``k_proj``/``v_proj``/``o_proj``, GPT-2 ``c_attn`` (fused
q/k/v) and ``c_proj``), a linear map ``W x + b`` of cost ``d_in·d_out + d_out``, is replaced by a
2-layer ReLU MLP ``W2 relu(W1 x + b1) + b2`` of equal cost: hidden width
``h = f·(d_in·d_out + d_out) / (d_in + d_out + 1)`` (f = ``cost``), rounded down to whole experts.

- **Distillation, layer-local:** the projection's inputs are captured from the (sparsified) dense
  model on training text; the MLP is fitted by MSE to the projection's own output on those inputs.
  It starts from the best rank-h/2 approximation, which a ReLU MLP represents exactly
  (``relu(z) - relu(-z) = z`` with W1 = [S½Vᵀ; -S½Vᵀ], W2 = [US½, -US½]), so training starts from the
  truncated SVD and can only improve on it.
- **Split and routers:** the MLP's hidden units go to experts by balanced k-means (as an FFN's do);
  regression routers are trained on the same captured inputs to predict each expert's output norm.
Per layer and projection one file is written as it finishes, so an interrupted stage resumes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from d2dmoe_converter.dense import DenseModel
from d2dmoe_converter.hf_model import decoder_layers
from d2dmoe_converter.kmeans import balanced_kmeans_order
from d2dmoe_converter.routers import RouterOptions, capture_inputs, train_layer_router
from d2dmoe_converter.split import split_ffn
from d2dmoe_vllm.checkpoint import projection_prefix
from d2dmoe_vllm.config import (PROJECTION_ACTIVATION, PROJECTIONS, ProjectionExperts, partial_qkv, projection_dims,
                                projection_family)


@dataclass(frozen=True)
class AttentionOptions:
    projections: tuple[str, ...] = ()   # () = off; "all" expands to the family's projections
    expert_size: int = 16                # hidden units per expert of the projection MLPs
    cost: float = 1.0                    # f: MLP cost relative to the projection's
    tokens: int = 8192                   # captured inputs per projection (10% held out for the MSE)
    seq_len: int = 256
    steps: int = 300                     # distillation steps per projection
    batch: int = 512
    lr: float = 1e-3


def resolve_projections(model_type: str, names: tuple[str, ...]) -> tuple[str, ...]:
    """The family's projection names for ``names`` ("all" or a subset), in the family's order."""
    family = PROJECTIONS[projection_family(model_type)][1]
    if names in (("all",), ("",), ()):
        return family if names == ("all",) else ()
    bad = [n for n in names if n not in family]
    if bad:
        raise ValueError(f"--attention-experts {','.join(names)}: {bad} are not {model_type} projections; "
                         f"use 'all' or a subset of {','.join(family)}")
    if partial_qkv(names):
        raise ValueError(f"--attention-experts: {partial_qkv(names)} without the rest: q_proj, k_proj and v_proj "
                         "go together (vLLM fuses them)")
    return tuple(n for n in family if n in names)


def mlp_hidden(d_in: int, d_out: int, expert_size: int, cost: float = 1.0) -> int:
    """Equal-cost hidden width (multiply-adds incl. biases), rounded down to whole experts."""
    h = cost * (d_in * d_out + d_out) / (d_in + d_out + 1)
    return max(expert_size, int(h // expert_size) * expert_size)


def projection_specs(dense: DenseModel, names: tuple[str, ...], opts: AttentionOptions) -> tuple[ProjectionExperts, ...]:
    dims = projection_dims(dense.config)
    specs = []
    for name in names:
        d_in, d_out = dims[name]
        h = mlp_hidden(d_in, d_out, opts.expert_size, opts.cost)
        specs.append(ProjectionExperts(name, d_in, d_out, h, (h // opts.expert_size,) * dense.num_layers,
                                       (opts.expert_size,) * dense.num_layers))
    return tuple(specs)


def dense_projection_names(dense: DenseModel, layer: int, name: str) -> list[str]:
    """The dense tensors an expert projection replaces (weight, and bias where the model has one)."""
    p = projection_prefix(dense.model_type, layer, name)
    return [p + t for t in ("weight", "bias") if p + t in dense.state]


def dense_projection(dense: DenseModel, layer: int, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [d_out, d_in], b [d_out]) of a projection (GPT-2's Conv1D stores W transposed; no bias -> 0)."""
    p = projection_prefix(dense.model_type, layer, name)
    w = dense.state[p + "weight"].float()
    w = w.t() if dense.model_type == "gpt2" else w
    b = dense.state.get(p + "bias")
    return w, (b.float() if b is not None else torch.zeros(w.shape[0]))


def svd_init(w: torch.Tensor, b: torch.Tensor, hidden: int) -> dict[str, torch.Tensor]:
    """A ReLU MLP equal to the best rank-hidden/2 approximation of ``x -> W x + b``."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = min(hidden // 2, s.numel())
    root = s[:r].sqrt()
    a = root[:, None] * vh[:r]            # [r, d_in]
    c = u[:, :r] * root[None, :]          # [d_out, r]
    w1 = torch.zeros(hidden, w.shape[1])
    w2 = torch.zeros(w.shape[0], hidden)
    w1[:r], w1[r : 2 * r] = a, -a
    w2[:, :r], w2[:, r : 2 * r] = c, -c
    return {"w1": w1, "b1": torch.zeros(hidden), "w2": w2, "b2": b.clone()}


def mlp_forward(x: torch.Tensor, m: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.relu(x @ m["w1"].t() + m["b1"]) @ m["w2"].t() + m["b2"]


def distill(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, hidden: int, opts: AttentionOptions, seed: int,
            device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Fit the MLP to the projection on captured inputs ``x``; returns it and held-out MSEs."""
    g = torch.Generator().manual_seed(seed)
    xs = x.to(device)
    w, b = w.to(device), b.to(device)
    n_val = max(1, len(xs) // 10)
    x_tr, x_val = xs[:-n_val], xs[-n_val:]
    y_val = x_val @ w.t() + b
    m = {k: v.to(device).requires_grad_() for k, v in svd_init(w.cpu(), b.cpu(), hidden).items()}

    def val_mse() -> float:
        with torch.no_grad():
            return float((mlp_forward(x_val, m) - y_val).pow(2).mean())

    before = val_mse()
    optim = torch.optim.Adam(m.values(), lr=opts.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, max(1, opts.steps))
    for _ in range(opts.steps):
        idx = torch.randint(0, len(x_tr), (min(opts.batch, len(x_tr)),), generator=g).to(device)
        xb = x_tr[idx]
        loss = (mlp_forward(xb, m) - (xb @ w.t() + b)).pow(2).mean()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        sched.step()
    metrics = {"mse_svd_init": before, "mse_distilled": val_mse(), "target_var": float(y_val.var())}
    return {k: v.detach().cpu() for k, v in m.items()}, metrics


def capture_projection_inputs(model, seqs: torch.Tensor, names: tuple[str, ...], out_dir: Path,
                              batch: int = 8) -> dict[tuple[int, str], Path]:
    """Each projection's input goes to ``<layer>_<key>.npy``. q, k and v read the same input, so it is
    stored once (key ``qkv``)."""
    attn_attr = PROJECTIONS[projection_family(model.config.model_type)][0].rstrip(".")
    gpt2 = model.config.model_type == "gpt2"
    paths, targets = {}, {}
    for i, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, attn_attr)
        for name in names:
            key = "qkv" if name in ("q_proj", "k_proj", "v_proj") else name
            path = paths[(i, name)] = out_dir / f"{i:02d}_{key}.npy"
            if path not in targets:  # GPT-2's Conv1D stores W as [in, out]
                module = getattr(attn, name)
                targets[path] = (module, module.weight.shape[0 if gpt2 else 1])
    capture_inputs(model, seqs, targets, "attention: capture projection inputs", batch)
    return paths


def convert_projection(x: torch.Tensor, dense: DenseModel, layer: int, spec: ProjectionExperts,
                       opts: AttentionOptions, router_opts: RouterOptions, seed: int,
                       device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Distil, split and route one projection: its expert tensors (names relative to the
    projection's prefix) and the metrics."""
    w, b = dense_projection(dense, layer, spec.name)
    mlp, metrics = distill(x, w, b, spec.hidden, opts, seed, device)
    E = spec.num_experts[layer]
    order = balanced_kmeans_order(mlp["w1"], E, seed=seed)
    experts = split_ffn({"w_in": mlp["w1"], "w_up": None, "w_out": mlp["w2"].t(), "b_in": mlp["b1"],
                         "b_out": mlp["b2"]}, order, E)
    router, rmetrics = train_layer_router(x, experts, PROJECTION_ACTIVATION, "d2dmoe", router_opts, seed, device)
    metrics.update({f"router_{k}": v for k, v in rmetrics.items()})
    return {**experts, **router}, metrics


def convert_attention(model, dense: DenseModel, specs: tuple[ProjectionExperts, ...], seqs: torch.Tensor,
                      opts: AttentionOptions, router_opts: RouterOptions, seed: int, part: Path,
                      device: torch.device) -> dict:
    """The whole stage into ``part``: one ``<layer>_<name>.safetensors`` per projection (kept on resume)."""
    names = tuple(s.name for s in specs)
    acts = part / "acts"
    todo = [(i, s) for i in range(dense.num_layers) for s in specs
            if not (part / f"{i:02d}_{s.name}.safetensors").is_file()]
    if todo:
        acts.mkdir(exist_ok=True)
        paths = capture_projection_inputs(model, seqs, names, acts)
        for i, spec in tqdm(todo, desc="attention: distil, split, route"):
            x = torch.from_numpy(np.load(paths[(i, spec.name)], mmap_mode="r")[:].copy())
            tensors, metrics = convert_projection(x, dense, i, spec, opts, router_opts, seed + 1000 * i, device)
            f = part / f"{i:02d}_{spec.name}.safetensors"
            tmp = f.with_name(f.name + ".tmp")
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={k: str(v) for k, v in metrics.items()})
            tmp.replace(f)
        shutil.rmtree(acts)
    return {"projections": {s.name: {"d_in": s.d_in, "d_out": s.d_out, "hidden": s.hidden,
                                     "experts": s.num_experts[0], "expert_size": s.expert_size[0]} for s in specs},
            "layers": load_metrics(part, dense.num_layers, specs)}


def load_metrics(part: Path, num_layers: int, specs) -> list[dict]:
    from safetensors import safe_open

    out = []
    for i in range(num_layers):
        for s in specs:
            with safe_open(str(part / f"{i:02d}_{s.name}.safetensors"), framework="pt") as st:
                out.append({"layer": i, "projection": s.name,
                            **{k: float(v) for k, v in st.metadata().items() if k != "format"}})
    return out


def load_projection_state(part: Path, dense: DenseModel, specs) -> dict[str, torch.Tensor]:
    """Every projection expert layer's tensors under their checkpoint names."""
    state = {}
    for i in range(dense.num_layers):
        for s in specs:
            p = projection_prefix(dense.model_type, i, s.name)
            state.update({p + k: v for k, v in load_file(str(part / f"{i:02d}_{s.name}.safetensors")).items()})
    return state
