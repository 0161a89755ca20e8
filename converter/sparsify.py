"""Stage 1, sparsify: ReLU-fication and fine-tuning with task loss + alpha * square Hoyer.

GPT-2: ``c_proj(ReLU(c_fc x))``; Gemma: ``down(ReLU(gate x) * up x)``, the Hoyer term on ReLU(gate x).
    L = L_task + alpha * mean_over_FFN_layers( mean_over_tokens( ||a||_1^2 / ||a||_2^2 ) )
With ``activation="keep"`` the model's own activation stays (Gemma's GELU-tanh gate) and the Hoyer term is
taken on its output: no exact zeros, but no ReLU-fication shock either (ReLU alone takes Gemma 3 270M's
held-out perplexity from 18 to 1087, and the fine-tuning's first job is to undo that); the routers then
drop experts whose outputs the penalty made small rather than zero. ``activation="anneal"`` starts from the
model's own activation and blends it into ReLU over the first ANNEAL_SHARE of the steps,
``a = relu(x) + (1 - blend) * (act(x) - relu(x))`` with blend rising linearly to 1: the kept activation's
gentle start, the ReLU's exact zeros at the end (the exported model is ReLU-fied).
L_task is next-token cross-entropy on the training text, or with ``distill`` = w > 0
(1 - w) * cross-entropy + w * KL(original || ReLU-fied) on the next-token distributions: the original
model (its own activation, frozen) is the teacher, which recovers more of its quality from the few
million tokens a registry corpus holds than cross-entropy alone.
AdamW, linear warm-up then cosine, gradient clipping, gradient accumulation, bf16 autocast on the
GPU (fp32 master weights). A training state is saved every ``save_every`` steps, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from d2dmoe_converter.distill_kl import distill_loss
from d2dmoe_converter.hf_model import activation_attr, decoder_layers

EPS = 1e-6


@dataclass(frozen=True)
class SparsifyOptions:
    steps: int = 0                # 0: skip fine-tuning (ReLU-fication alone if --relu)
    batch: int = 8                # sequences per micro-batch
    accum: int = 1                # micro-batches per step
    seq_len: int = 256
    lr: float = 1e-4
    warmup: int = 50
    alpha: float = 1e-4           # square-Hoyer weight
    clip: float = 1.0
    save_every: int = 50
    distill: float = 0.0          # weight of KL to the original model's next-token distribution, in [0, 1]
    passes: int = 1               # times the training text may be reused when steps ask for more than it holds
    generated: float = 0.0        # share of the sequences continued by the original model (teacher_text.py)
    generated_prompt: int = 32    # tokens of real text such a sequence keeps before the teacher's continuation
    generated_engine: str = "auto"  # who samples it: auto (vLLM on a GPU where installed), vllm, transformers
    generated_engines: int = 1    # vLLM engines side by side on the GPU (teacher_text.coordinate)
    activation: str = "relu"      # relu: ReLU-fication (the paper); keep: the model's own activation, Hoyer on it;
                                  # anneal: the model's own activation blended into ReLU over the first steps

    def stage_key(self) -> dict:
        """What the sparsify stage's fingerprint holds: every field, less the teacher-text ones when no
        text is generated and the activation when it is the paper's ReLU (work dirs from before they
        existed keep their stage)."""
        fields = asdict(self)
        del fields["generated_engine"]  # the engine that sampled it is in the teacher text's own fingerprint
        del fields["generated_engines"]  # how many of them ran: not what the text is
        if self.activation == "relu":
            del fields["activation"]
        elif self.activation == "anneal":
            fields["anneal_share"] = ANNEAL_SHARE   # the schedule decides the model too
        return fields if self.generated else {k: v for k, v in fields.items() if not k.startswith("generated")}

    @property
    def relu(self) -> bool:
        """Whether this stage's model comes out ReLU-fied (it runs, and does not keep the activation)."""
        return self.steps > 0 and self.activation != "keep"

    def text_key(self) -> dict:
        """What decides the teacher text: which sequences, how long, how many (not lr, alpha, ...)."""
        return {k: getattr(self, k) for k in ("steps", "batch", "accum", "seq_len", "passes", "generated",
                                             "generated_prompt")}


def square_hoyer(a: torch.Tensor) -> torch.Tensor:
    """mean over tokens of ||a||_1^2 / ||a||_2^2 (last dim = neurons); between 1 and the width."""
    a = a.float()
    return (a.abs().sum(-1) ** 2 / (a.pow(2).sum(-1) + EPS)).mean()


ACTIVATIONS = ("relu", "keep", "anneal")
NEAR_ZERO = 1e-2   # a kept (GELU) activation counts as zero below this magnitude: GELU(-3) is -0.004
ANNEAL_SHARE = 0.5  # anneal: the share of the steps over which the own activation becomes ReLU


class HoyerActivation(nn.Module):
    """An FFN activation (ReLU, the model's own ``fn``, or ``fn`` blended into ReLU by ``blend``) that keeps
    the square Hoyer of its last output (for the loss) and its zero fraction (exact zeros where ReLU is in it,
    ``|a| < NEAR_ZERO`` for a kept activation), both as tensors on the activation's device: reading them is
    the caller's one host sync per step, not one per layer in the middle of the forward pass."""

    def __init__(self, fn: nn.Module | None = None, anneal: bool = False):
        super().__init__()
        self.fn = fn   # None: ReLU
        self.anneal = anneal
        self.blend = 0.0   # anneal: 0 = fn, 1 = ReLU (set per step by finetune)
        self.penalised = True   # whether the loss takes the Hoyer term (set by finetune: alpha > 0)
        self.hoyer: torch.Tensor | None = None
        self.zero_fraction: torch.Tensor | None = None

    def forward(self, x):
        if self.fn is None or (self.anneal and self.blend >= 1):
            a = torch.relu(x)
        elif self.anneal:
            r = torch.relu(x)
            a = r + (1 - self.blend) * (self.fn(x) - r)
        else:
            a = self.fn(x)
        if self.training:
            # without a Hoyer term in the loss (adapt), measured only: no graph through it, no fp32 copy kept
            with torch.set_grad_enabled(self.penalised and torch.is_grad_enabled()):
                self.hoyer = square_hoyer(a)
            small = a.detach().abs() < NEAR_ZERO if self.fn is not None and not self.anneal else a.detach() == 0
            self.zero_fraction = small.float().mean()
        return a


def hoyer_activations_(model: nn.Module, activation: str = "relu") -> list[HoyerActivation]:
    """Wrap every FFN activation (the gate's, for Gemma) in a HoyerActivation, in place: a ReLU in its
    place (``relu``), the model's own activation measured (``keep``), or blended into ReLU (``anneal``:
    ``model`` is built with its own activation, not ReLU-fied)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"sparsify activation {activation!r}: use one of {', '.join(ACTIVATIONS)}")
    acts = []
    for layer in decoder_layers(model):
        name = activation_attr(layer.mlp)
        act = HoyerActivation(None if activation == "relu" else getattr(layer.mlp, name), anneal=activation == "anneal")
        setattr(layer.mlp, name, act)
        acts.append(act)
    return acts


def relu_blend(step: int, opts: SparsifyOptions) -> float:
    """anneal: how far step ``step`` (0-based) has blended the own activation into ReLU; 1 from
    ANNEAL_SHARE of the steps on (so the last steps train the exported, ReLU-fied model)."""
    return min(1.0, (step + 1) / max(1.0, ANNEAL_SHARE * opts.steps))


def lr_at(step: int, opts: SparsifyOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    return opts.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def finetune(model: nn.Module, seqs: torch.Tensor, opts: SparsifyOptions, state_file: Path,
             teacher: nn.Module | None = None, desc: str = "sparsify (Hoyer fine-tuning)") -> dict:
    """Fine-tune ``model`` (its activations already wrapped by ``hoyer_activations_``) on ``seqs`` [steps*accum*batch, seq_len]; resumes
    from ``state_file`` if present. ``teacher`` (the original model, frozen) is needed when
    ``opts.distill`` > 0. Returns the training log."""
    if opts.distill > 0 and teacher is None:
        raise ValueError("distill > 0 needs the original model as teacher")
    device = next(model.parameters()).device
    acts = [getattr(layer.mlp, activation_attr(layer.mlp)) for layer in decoder_layers(model)]
    for act in acts:
        act.penalised = opts.alpha > 0
    # fused: one kernel for all 270M+ parameters' update instead of a few per tensor (CUDA only)
    optim = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.0, fused=device.type == "cuda")
    log: list[dict] = []
    start = 0
    if state_file.is_file():
        saved = torch.load(state_file, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])
        start, log = saved["step"], saved["log"]
    model.train()
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    bar = tqdm(range(start, opts.steps), desc=desc, initial=start, total=opts.steps)
    t0 = time.time()
    for step in bar:
        t_step = time.time()
        for group in optim.param_groups:
            group["lr"] = lr_at(step, opts)
        blend = relu_blend(step, opts)
        for act in acts:
            act.blend = blend
        task_sum = hoyer_sum = 0.0  # become device tensors: no host sync until the step's log line
        for micro in range(opts.accum):
            i = (step * opts.accum + micro) * opts.batch
            ids = seqs[i : i + opts.batch].to(device)
            with torch.autocast(**autocast):
                out = model(input_ids=ids, labels=ids if opts.distill < 1 else None)  # no cross-entropy at w = 1
                task = out.loss if opts.distill < 1 else 0.0
                if opts.distill > 0:
                    with torch.no_grad():
                        teacher_logits = teacher(input_ids=ids).logits
                    kl = distill_loss(out.logits, teacher_logits)   # every position but the last
                    task = (1 - opts.distill) * task + opts.distill * kl
            hoyer = torch.stack([a.hoyer for a in acts]).mean()
            ((task + opts.alpha * hoyer) / opts.accum).backward()
            out = teacher_logits = None   # the logits (4.3 GB each at the recipe's size) go before the next forward
            task_sum = task_sum + task.detach().float() / opts.accum
            hoyer_sum = hoyer_sum + hoyer.detach().float() / opts.accum
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        zeros = torch.stack([a.zero_fraction for a in acts]).mean()
        task_sum, hoyer_sum, zeros, grad_norm = torch.stack(   # the step's one host sync
            [t.to(zeros.device, torch.float32) for t in (task_sum, hoyer_sum, zeros, grad_norm)]).tolist()
        log.append({"step": step + 1, "task_loss": task_sum, "hoyer": hoyer_sum, "zero_fraction": zeros,
                    "grad_norm": grad_norm, "lr": lr_at(step, opts), "seconds": time.time() - t_step,
                    **({"relu_blend": blend} if opts.activation == "anneal" else {})})
        bar.set_postfix(loss=f"{task_sum:.3f}", hoyer=f"{hoyer_sum:.1f}", zeros=f"{zeros:.2f}")
        if (step + 1) % opts.save_every == 0 and step + 1 < opts.steps:
            tmp = state_file.with_name(state_file.name + ".tmp")
            torch.save({"model": model.state_dict(), "optim": optim.state_dict(), "step": step + 1, "log": log}, tmp)
            tmp.replace(state_file)
    model.eval()
    return {"log": log, "seconds_this_run": round(time.time() - t0, 1)}


def plot_log(log: list[dict], path: Path, activation: str = "relu") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key, title in zip(axes, ("task_loss", "hoyer", "zero_fraction"),
                              ("task loss", "square Hoyer (mean over layers)",
                               f"FFN activations {'below 0.01 in magnitude' if activation == 'keep' else 'that are 0'}")):
        ax.plot(steps, [r[key] for r in log])
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
