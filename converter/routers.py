"""Stage 3, routers: train each FFN layer's router on the frozen model's hidden states.

Router: ``Linear(d -> w, no bias) -> ReLU -> Linear(w -> E, no bias) -> abs`` (the plugin's layout).
- D2DMoE (regression): MSE to each expert's output norm ||E_e(x)||_2 (shared bias excluded).
- MoEfication (classifier): the target is the expert's activation sum normalised by the token's
  largest; the score s >= 0 is read as the probability p = 1 - exp(-s) in a binary cross-entropy,
  so ranking by score (top-k) is ranking by probability.
The FFN inputs of all layers are captured in one pass over the corpus into per-layer files
(memory stays bounded by one layer); layers are then trained one at a time, each saved as it
finishes, so an interrupted stage resumes at the next layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from d2dmoe_converter.hf_model import base_model, decoder_layers
from d2dmoe_kernels.reference import apply_activation

METHODS = ("d2dmoe", "moefication")


@dataclass(frozen=True)
class RouterOptions:
    width: int = 128
    tokens: int = 16384          # captured tokens per layer (10% held out for the reported MSE)
    seq_len: int = 256
    steps: int = 2000            # 0: keep untrained (random) routers; 500 (before session 62) cost 4% at 50%
    batch: int = 256             # tokens per step
    lr: float = 2e-3


def capture_inputs(model, seqs: torch.Tensor, targets: dict[Path, tuple[nn.Module, int]], desc: str,
                   batch: int = 8) -> None:
    """One pass of the transformer over ``seqs``; the input of each target module (of width ``d``)
    goes to its ``.npy`` file [tokens, d] (memory-mapped: memory stays bounded)."""
    n = seqs.numel()
    cursor = [0]
    handles = []
    for path, (module, d) in targets.items():
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))

        def pre(mod, args, kwargs, mm=mm, d=d):
            x = (args[0] if args else kwargs["hidden_states"]).detach().float().reshape(-1, d).cpu().numpy()
            mm[cursor[0] : cursor[0] + len(x)] = x

        handles.append((module.register_forward_pre_hook(pre, with_kwargs=True), mm))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(seqs), batch), desc=desc):
                ids = seqs[i : i + batch]
                base_model(model)(input_ids=ids.to(device))
                cursor[0] += ids.numel()
    finally:
        for h, mm in handles:
            h.remove()
            mm.flush()


def ffn_input_paths(out_dir: Path, num_layers: int) -> list[Path]:
    return [out_dir / f"layer_{i:02d}.npy" for i in range(num_layers)]


def capture_ffn_inputs(model, seqs: torch.Tensor, out_dir: Path, batch: int = 8,
                       desc: str = "routers: capture FFN inputs") -> list[Path]:
    """The input of every layer's FFN goes to ``layer_XX.npy`` [tokens, d]."""
    layers = decoder_layers(model)
    paths = ffn_input_paths(out_dir, len(layers))
    capture_inputs(model, seqs, {p: (layer.mlp, model.config.hidden_size) for p, layer in zip(paths, layers)},
                   desc, batch)
    return paths


def expert_hidden(x, ex: dict[str, torch.Tensor | None], activation: str) -> torch.Tensor:
    """[N, E, e] hidden activations of every expert (after act and gate)."""
    E, e, d = ex["experts.w_in"].shape
    h = x @ ex["experts.w_in"].reshape(E * e, d).t()
    if ex.get("experts.b_in") is not None:
        h = h + ex["experts.b_in"].reshape(E * e)
    h = apply_activation(h, activation)
    if ex.get("experts.w_up") is not None:
        h = h * (x @ ex["experts.w_up"].reshape(E * e, d).t())
    return h.reshape(-1, E, e)


def router_targets(x, ex: dict[str, torch.Tensor | None], activation: str, method: str) -> torch.Tensor:
    """[N, E]: expert output norms (d2dmoe) or normalised activation sums (moefication)."""
    h = expert_hidden(x, ex, activation)
    if method == "moefication":
        s = h.abs().sum(-1)
        return s / s.amax(-1, keepdim=True).clamp_min(1e-12)
    out = torch.bmm(h.transpose(0, 1), ex["experts.w_out"])   # [E, N, d]
    return out.norm(dim=-1).t()


def router_loss(scores, target, method: str) -> torch.Tensor:
    if method == "moefication":  # BCE with p = 1 - exp(-s): log p = log(-expm1(-s)), log(1-p) = -s
        s = scores.clamp_min(1e-6)
        return -(target * torch.log(-torch.expm1(-s)) - (1 - target) * s).mean()
    return (scores - target).pow(2).mean()


def router_forward(x, w1, w2):
    return (torch.relu(x @ w1.t()) @ w2.t()).abs()


def train_layer_router(x: torch.Tensor, ex: dict, activation: str, method: str, opts: RouterOptions, seed: int,
                       device: torch.device) -> tuple[dict[str, torch.Tensor], dict]:
    """Router weights for one layer and its held-out loss before/after training."""
    g = torch.Generator().manual_seed(seed)
    ex = {k: (v.to(device) if v is not None else None) for k, v in ex.items()}
    n_val = max(1, len(x) // 10)
    xs = x.to(device)
    with torch.no_grad():
        y = torch.cat([router_targets(xs[i : i + 2048], ex, activation, method) for i in range(0, len(xs), 2048)])
    x_tr, y_tr, x_val, y_val = xs[:-n_val], y[:-n_val], xs[-n_val:], y[-n_val:]
    E, d, w = ex["experts.w_in"].shape[0], xs.shape[1], opts.width
    w1 = ((torch.rand(w, d, generator=g) * 2 - 1) * d**-0.5).to(device).requires_grad_()
    w2 = ((torch.rand(E, w, generator=g) * 2 - 1) * w**-0.5).to(device).requires_grad_()

    def val_loss():
        with torch.no_grad():
            return float(router_loss(router_forward(x_val, w1, w2), y_val, method))

    before = val_loss()
    if opts.steps:
        optim = torch.optim.AdamW([w1, w2], lr=opts.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, opts.steps)
        for _ in range(opts.steps):
            idx = torch.randint(0, len(x_tr), (min(opts.batch, len(x_tr)),), generator=g).to(device)
            loss = router_loss(router_forward(x_tr[idx], w1, w2), y_tr[idx], method)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
    after = val_loss()
    metrics = {"val_loss_before": before, "val_loss_after": after, "target_mean": float(y_val.mean()),
               "target_var": float(y_val.var())}
    if method == "d2dmoe":
        metrics["val_r2"] = 1 - after / max(metrics["target_var"], 1e-12)
    return {"router.in_proj.weight": w1.detach().cpu(), "router.out_proj.weight": w2.detach().cpu()}, metrics


def train_routers(acts: list[Path], experts: list[dict], activation: str, method: str, opts: RouterOptions,
                  seed: int, out_dir: Path, device: torch.device) -> list[dict]:
    """Train every layer's router; ``out_dir/router_XX.safetensors`` per layer (existing ones are kept)."""
    metrics = []
    for i in tqdm(range(len(acts)), desc=f"routers: train ({method})"):
        f = out_dir / f"router_{i:02d}.safetensors"
        if f.is_file():
            metrics.append(None)
            continue
        x = torch.from_numpy(np.load(acts[i], mmap_mode="r")[:].copy())
        weights, m = train_layer_router(x, experts[i], activation, method, opts, seed + i, device)
        tmp = f.with_name(f.name + ".tmp")
        save_file(weights, str(tmp), metadata={k: str(v) for k, v in m.items()})
        tmp.replace(f)
        metrics.append(m)
    out = []
    for i, m in enumerate(metrics):  # resumed layers: read their metrics back from the file header
        if m is None:
            from safetensors import safe_open

            with safe_open(str(out_dir / f"router_{i:02d}.safetensors"), framework="pt") as st:
                m = {k: float(v) for k, v in st.metadata().items() if k != "format"}
        out.append(m)
    return out


def load_routers(out_dir: Path, num_layers: int) -> list[dict[str, torch.Tensor]]:
    return [load_file(str(out_dir / f"router_{i:02d}.safetensors")) for i in range(num_layers)]
