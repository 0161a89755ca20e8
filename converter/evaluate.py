"""Cost against quality: ``d2dmoe-eval`` (command line) and ``evaluate()`` (Python API).

For a dense checkpoint and D2DMoE checkpoints converted from it, sweeps tau (D2DMoE checkpoints:
dynamic-k) and k (MoEfication checkpoints: fixed top-k, k = round(fraction x experts), at least 1)
and measures, with the torch reference model (``moe_model``; the selection rule the kernels use):

- **cost**, counted per token from the experts each evaluated token actually executed:
  ``ffn_compute`` = executed expert FLOPs / dense FFN FLOPs (routers excluded), and
  ``model_compute`` = the model's FLOPs / the dense model's FLOPs (routers included);
- **quality**: perplexity on held-out text per corpus, zero-shot multiple-choice accuracy per task
  (item counts stated in the result);
- **expert usage**: per layer, the histogram of experts executed per token (the paper's Figure 6
  analogue).

Compute model (FLOPs per token; a multiply-add is 2 FLOPs; biases, norms, residual adds, softmax and
the embedding lookup are O(d) per token and left out: < 0.1% of the total for every supported model):

    attention projections  2 d (H h) + 2 * 2 d (K h) + 2 (H h) d      (q; k and v; o)
                           GPT-2: 2 d 3d + 2 d d
    attention scores       2 * 2 H h c_l                               (q.k and the weighted sum of v)
                           c_l = mean over the positions p = 1..S of a sequence of S = seq_len tokens
                           of the positions attended: min(p, window_l) (window_l = S for full attention)
    FFN, dense             m * 2 d d_ff          m = 3 (gated: gate, up, down), 2 (GPT-2: in, out)
    FFN, experts           k_l(x) * m * 2 d e    k_l(x) experts of e neurons executed by token x in layer l
    router                 2 d w + 2 w E
    LM head                2 d V
    attention projections as experts (when the checkpoint has them): each replaced projection's dense
    cost is swapped for its executed experts, k(x) * 2 e (d_in + d_out), plus its router 2 d_in w + 2 w E

with d the hidden size, H / K query / key-value heads of size h, V the vocabulary, w the router width,
E experts per layer. Summed over layers; ``model_compute`` = (attention + routers + executed experts +
LM head) / (attention + dense FFN + LM head), averaged over every evaluated token (text and task tokens).

Zero-shot multiple choice: each choice's continuation log-probability given the prompt (prompt and
continuation tokenised separately, BOS first where the model needs it, the prompt cut from the left to
``max_item_tokens``), argmax wins; per-character length normalisation where standard (see
``eval_data.LENGTH_NORMALISED``; prompt formats in ``eval_data.task_items``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from d2dmoe_converter.convert import resolve_device
from d2dmoe_converter.corpus import CorpusError, token_sequences
from d2dmoe_converter.dense import DenseModel, load_dense, load_tokenizer
from d2dmoe_converter.eval_data import (CORPORA, LENGTH_NORMALISED, TASKS, check_available, corpus_documents,
                                        task_items)
from d2dmoe_converter.hf_model import build_model
from d2dmoe_converter.moe_model import (attach_experts, counting, expert_layers, ffn_layers, perplexity,
                                        projection_layers, set_selection)
from d2dmoe_converter.attention import dense_projection_names
from d2dmoe_converter.split import dense_ffn_names
from d2dmoe_vllm.config import CheckpointError, valid_tau

METHOD_STYLE = {"d2dmoe": ("o-", "tab:blue"), "moefication": ("s--", "tab:orange"),
                "d2dmoe+attention": ("^-.", "tab:green"), "d2dmoe-oracle": ("o:", "tab:purple")}


@dataclass(frozen=True)
class EvalOptions:
    taus: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2, 0.3)          # D2DMoE checkpoints
    top_k_fractions: tuple[float, ...] = (1.0, 0.75, 0.5, 0.25)   # MoEfication checkpoints: k = round(f E)
    corpora: tuple[str, ...] = CORPORA
    tokens: int = 4096               # held-out tokens per corpus (sequences of seq_len)
    tasks: tuple[str, ...] = ("boolq", "piqa", "arc_easy")
    items: int = 100                 # items per task: the first ``items`` of the validation split
    seq_len: int = 256
    max_item_tokens: int = 512       # prompt + continuation; longer prompts are cut from the left
    batch: int = 2                   # perplexity sequences per forward
    device: str = "auto"
    dense: bool = True               # evaluate the dense model too (the reference line)
    tags: tuple[tuple[str, str], ...] = ()   # extra key/value pairs written on every point
    oracle: bool = False             # also sweep D2DMoE checkpoints selecting on the true expert output norms


def check_options(opts: EvalOptions) -> None:
    for t in opts.taus:
        if not valid_tau(t):
            raise ValueError(f"tau {t!r} is out of range: tau is a fraction of the largest router score, in [0, 1] "
                             "(0 runs every expert, 1 only the arg-max)")
    for f in opts.top_k_fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < float(f) <= 1.0:
            raise ValueError(f"top-k fraction {f!r} is out of range: give the fraction of experts per token, in (0, 1]")
    for name in ("tokens", "items", "seq_len", "max_item_tokens", "batch"):
        if getattr(opts, name) <= 0:
            raise ValueError(f"{name} must be positive, got {getattr(opts, name)}")
    if opts.tokens < opts.seq_len and opts.corpora:
        raise ValueError(f"tokens per corpus ({opts.tokens}) must be at least seq_len ({opts.seq_len})")
    check_available(tuple(opts.corpora), tuple(opts.tasks))


# ---------------------------------------------------------------- checkpoints

@dataclass
class Checkpoint:
    path: Path
    config: dict        # the HF config (without the d2dmoe block)
    d2dmoe: dict
    method: str
    state: dict[str, torch.Tensor]


def replaced_tensors(dense: DenseModel, d2dmoe: dict) -> set[str]:
    """Names of the dense tensors a checkpoint holds as experts instead: the FFNs, and the attention
    projections it converted (``expert_modules`` beyond ``mlp``)."""
    projections = [m for m in d2dmoe.get("expert_modules", ()) if m != "mlp"]
    return {n for i in range(dense.num_layers)
            for n in dense_ffn_names(dense, i) + [x for p in projections for x in dense_projection_names(dense, i, p)]}


def load_checkpoint(path: str | Path, dense: DenseModel) -> Checkpoint:
    """A D2DMoE checkpoint, refused unless it was converted from ``dense`` (same shapes)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path}: {'does not exist' if not path.exists() else 'has no config.json'}. "
                              "Fix: pass a directory written by d2dmoe-convert")
    config = json.loads((path / "config.json").read_text())
    d2 = config.pop("d2dmoe", None)
    if d2 is None:
        raise CheckpointError(f"checkpoint {path}: config.json has no 'd2dmoe' block (a dense model?). "
                              "Fix: pass a directory written by d2dmoe-convert")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"checkpoint {path}: no *.safetensors weights. Fix: convert again with d2dmoe-convert")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    report = path / "d2dmoe_report.json"
    method = json.loads(report.read_text()).get("method") if report.is_file() else None
    method = method or ("moefication" if d2.get("top_k") else "d2dmoe")
    if d2.get("reference", "max") != "max":
        method += f"-{d2['reference']}"  # its own curve: tau a fraction of another reference (--reference)
    if d2.get("layer_tau"):
        method += "-per-layer"   # its own curve: a tau per FFN layer (--tau-per-layer)
    if any(m != "mlp" for m in d2.get("expert_modules", ())):
        method += "+attention"   # its own curve: attention projections run as experts too
    ffn = replaced_tensors(dense, d2)
    problems = []
    if config.get("model_type") != dense.model_type:
        problems.append(f"model_type {config.get('model_type')!r} (dense: {dense.model_type!r})")
    if d2.get("d_ff") != dense.d_ff or len(d2.get("num_experts", ())) != dense.num_layers:
        problems.append(f"d_ff {d2.get('d_ff')} over {len(d2.get('num_experts', ()))} layers "
                        f"(dense: {dense.d_ff} over {dense.num_layers})")
    for name, tensor in dense.state.items():
        if name in ffn:
            continue
        if name not in state:
            problems.append(f"tensor {name} is missing")
        elif tuple(state[name].shape) != tuple(tensor.shape):
            problems.append(f"tensor {name} has shape {tuple(state[name].shape)} (dense: {tuple(tensor.shape)})")
        if len(problems) >= 3:
            break
    if problems:
        raise CheckpointError(f"checkpoint {path} was not converted from dense model {dense.source or 'given'}: "
                              + "; ".join(problems) + ". Fix: pass the dense checkpoint it was converted from")
    return Checkpoint(path, config, d2, method, state)


def build_moe(ckpt: Checkpoint, dense: DenseModel, device) -> torch.nn.Module:
    """The torch reference D2DMoE model: the checkpoint's non-expert weights, its expert layers."""
    ffn = replaced_tensors(dense, ckpt.d2dmoe)
    base = {k: v.float() for k, v in ckpt.state.items() if k in dense.state and k not in ffn}
    base.update({k: dense.state[k] for k in ffn})  # placeholders: replaced by expert layers next
    config = {k: v for k, v in ckpt.config.items() if k not in ("architectures", "dtype", "torch_dtype")}
    model = build_model(DenseModel(config, base, dense.source, dense.tokenizer), device=device)
    attach_experts(model, {k: v.float() for k, v in ckpt.state.items()}, dense.model_type, ckpt.d2dmoe["activation"],
                   reference=ckpt.d2dmoe.get("reference", "max"))
    return model


def settings_for(ckpt: Checkpoint, opts: EvalOptions) -> list[tuple[str, float, int, bool, tuple[float, ...]]]:
    """(label, tau, top_k, oracle, layer_tau) per sweep point of this checkpoint (``sweep_settings``)."""
    return sweep_settings(ckpt.method, ckpt.d2dmoe["num_experts"][0], tuple(ckpt.d2dmoe.get("layer_tau") or ()),
                          ckpt.d2dmoe.get("tau", 0.0), opts)


def sweep_settings(method: str, num_experts: int, layer_tau: tuple[float, ...], tau0: float,
                   opts: EvalOptions) -> list[tuple[str, float, int, bool, tuple[float, ...]]]:
    """(label, tau, top_k, oracle, layer_tau) per sweep point of a checkpoint of ``method`` with ``num_experts``
    experts in its first FFN layer and calibrated ``tau0`` / ``layer_tau``; with ``opts.oracle`` D2DMoE
    checkpoints get each tau twice, the second time selecting on the true expert output norms. A checkpoint
    with per-layer taus is measured at its calibrated taus, then at each sweep tau as its layer taus scaled by
    sweep tau / its tau (the allocation's shape kept, its level swept)."""
    if method == "moefication":
        E = num_experts
        ks = sorted({max(1, min(E, round(f * E))) for f in opts.top_k_fractions}, reverse=True)
        return [(f"k={k}/{E}", 0.0, k, False, ()) for k in ks]
    if layer_tau and tau0 > 0:
        scaled = [(f"tau={t:g} per-layer", float(t), 0, False, tuple(min(1.0, x * (t / tau0)) for x in layer_tau))
                  for t in opts.taus]
        return [("calibrated per-layer", float(tau0), 0, False, layer_tau), *scaled]
    points = [(f"tau={t:g}", float(t), 0, False, ()) for t in opts.taus]
    return points + ([(f"tau={t:g} oracle", float(t), 0, True, ()) for t in opts.taus] if opts.oracle else [])


def unfinished_checkpoints(result: dict) -> list[str]:
    """The checkpoints of a sweep JSON (``evaluate``'s) whose points do not cover every setting
    ``sweep_settings`` gives them, read from the JSON alone: a sweep finished over two device runs is
    whole only when every checkpoint is (``gpu_convert_recipe.py --merge`` checks it)."""
    o = result["options"]
    opts = EvalOptions(taus=tuple(o["taus"]), top_k_fractions=tuple(o["top_k_fractions"]), oracle=o.get("oracle", False))
    missing = []
    for c in result["checkpoints"]:
        points = [p for p in result["points"] if p["checkpoint"] == c]
        if not points:
            missing.append(c)
            continue
        first = points[0]   # points come in settings' order: the first carries a per-layer one's calibrated taus
        wanted = sweep_settings(first["method"].removesuffix("-oracle"), first["usage"]["num_experts"][0],
                                tuple(first.get("layer_tau") or ()), first["tau"], opts)
        if {s[0] for s in wanted} - {p["setting"] for p in points}:
            missing.append(c)
    return missing


# ---------------------------------------------------------------- compute model

def flops_per_token(config: dict, seq_len: int, d2dmoe: dict | None = None) -> dict:
    """Per-token FLOPs of each part (see the module docstring), per layer where they differ."""
    gpt2 = config["model_type"] == "gpt2"
    d = config.get("hidden_size") or config["n_embd"]
    L = config.get("num_hidden_layers") or config["n_layer"]
    H = config.get("num_attention_heads") or config["n_head"]
    K = config.get("num_key_value_heads") or H
    h = config.get("head_dim") or d // H
    V = config["vocab_size"]
    d_ff = (config.get("n_inner") or 4 * d) if gpt2 else config["intermediate_size"]
    m = 2 if gpt2 else 3
    types = config.get("layer_types") or ["full_attention"] * L
    window = config.get("sliding_window") or seq_len
    ctx = []
    for t in types[:L]:
        w = min(window, seq_len) if t == "sliding_attention" else seq_len
        ctx.append(sum(min(p, w) for p in range(1, seq_len + 1)) / seq_len)
    proj = 2 * d * 3 * d + 2 * d * d if gpt2 else 2 * d * H * h + 4 * d * K * h + 2 * H * h * d
    out = {"attention_projections": [proj] * L, "attention_scores": [4 * H * h * c for c in ctx],
           "ffn_dense": [m * 2 * d * d_ff] * L, "lm_head": 2 * d * V, "context_length": seq_len}
    if d2dmoe is not None:
        E, e, w = d2dmoe["num_experts"], d2dmoe["expert_size"], d2dmoe["router_width"]
        out["router"] = [2 * d * w + 2 * w * E[i] for i in range(L)]
        out["expert"] = [m * 2 * d * e[i] for i in range(L)]
    out["dense_total"] = sum(out["attention_projections"]) + sum(out["attention_scores"]) + sum(out["ffn_dense"]) + out["lm_head"]
    return out


def compute_fractions(flops: dict, tokens: list[int], pairs: list[int],
                      projections: dict | None = None) -> tuple[float, float]:
    """(ffn_compute, model_compute) from per-layer evaluated tokens and executed token-expert pairs;
    ``projections`` (FLOPs summed over the evaluated tokens, see ``_Usage``) swaps the replaced attention
    projections' dense cost for their executed experts and routers."""
    ffn_done = sum(p * f for p, f in zip(pairs, flops["expert"]))
    ffn_full = sum(t * f for t, f in zip(tokens, flops["ffn_dense"]))
    n = tokens[0]
    rest = sum(flops["attention_projections"]) + sum(flops["attention_scores"]) + sum(flops["router"]) + flops["lm_head"]
    if projections:
        rest += (projections["executed"] + projections["router"] - projections["replaced_dense"]) / n
    model = (rest + ffn_done / n) / flops["dense_total"]
    return ffn_done / ffn_full, model


def compute_without_lm_head(flops: dict, ffn_compute: float, projection_delta: float = 0.0) -> float:
    """The model-compute fraction with the LM head left out of both sides (it dominates small models
    with large vocabularies: Gemma 3 270M's 262k-entry head is ~60% of its FLOPs per token).
    ``projection_delta``: FLOPs per token that attention-projection experts add (negative: save)."""
    attn = sum(flops["attention_projections"]) + sum(flops["attention_scores"])
    ffn = sum(flops["ffn_dense"])
    return (attn + projection_delta + sum(flops.get("router", [0])) + ffn_compute * ffn) / (attn + ffn)


# ---------------------------------------------------------------- measuring

@dataclass
class EvalData:
    corpora: dict[str, torch.Tensor] = field(default_factory=dict)           # name -> [N, seq_len] ids
    tasks: dict[str, list[tuple[list[int], list[list[int]], int]]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def prepare_data(dense: DenseModel, opts: EvalOptions, tok=None) -> EvalData:
    tok = tok or load_tokenizer(dense)
    bos = dense.bos_token_id(tok)
    data = EvalData(info={"corpora": {}, "tasks": {}})
    n = opts.tokens // opts.seq_len
    for c in opts.corpora:
        data.corpora[c] = token_sequences(tok, corpus_documents(c), n, opts.seq_len, bos=bos, what=f"corpus {c!r}")
        data.info["corpora"][c] = {"tokens": n * opts.seq_len, "sequences": n, "seq_len": opts.seq_len}
    for t in opts.tasks:
        items = task_items(t)[: opts.items]
        enc = []
        for it in items:
            ctx = tok(it.prompt, add_special_tokens=False)["input_ids"]
            conts = [tok(c, add_special_tokens=False)["input_ids"] for c in it.choices]
            keep = opts.max_item_tokens - max(map(len, conts)) - (bos is not None)
            ctx = ([bos] if bos is not None else []) + ctx[max(0, len(ctx) - keep):]
            enc.append((ctx, conts, it.label))
        data.tasks[t] = enc
        data.info["tasks"][t] = {"items": len(enc), "length_normalised": LENGTH_NORMALISED[t],
                                 "choices_per_item": sorted({len(e[1]) for e in enc}),
                                 "chance": sum(1 / len(e[1]) for e in enc) / max(1, len(enc))}
    return data


@torch.no_grad()
def choice_logprobs(model, ctx: list[int], conts: list[list[int]]) -> list[float]:
    """log P(continuation | ctx) summed over the continuation's tokens, for each continuation. One
    forward scores all of an item's choices: the sequences ctx + choice padded on the right, where
    causal attention keeps padding out of every real position (the expert counters skip it,
    ``counting``); when all continuations are single tokens, one forward of the prompt serves them all."""
    device = next(model.parameters()).device
    if all(len(c) == 1 for c in conts):
        logits = model(input_ids=torch.tensor([ctx], device=device), logits_to_keep=1).logits[0, -1]
        lp = torch.log_softmax(logits.float(), -1)
        return lp[[c[0] for c in conts]].tolist()
    longest = max(map(len, conts))
    ids = torch.zeros(len(conts), len(ctx) + longest, dtype=torch.long)
    target = torch.zeros(len(conts), longest, dtype=torch.long)
    real = torch.zeros(len(conts), len(ctx) + longest, dtype=torch.bool)
    for i, c in enumerate(conts):
        ids[i, : len(ctx) + len(c)] = torch.tensor(ctx + c)
        target[i, : len(c)] = torch.tensor(c)
        real[i, : len(ctx) + len(c)] = True
    ids, target, real = ids.to(device), target.to(device), real.to(device)
    with counting(model, real):  # logits at positions len(ctx)-1 .. len(ctx)+longest-2 predict the choices
        logits = model(input_ids=ids, logits_to_keep=longest + 1).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, target[..., None])[..., 0]
    return torch.where(real[:, len(ctx):], lp, 0.0).sum(-1).tolist()


def score_choices(logprobs: list[float], choices: list[str] | None, normalise: bool) -> int:
    """Index of the winning choice (log-prob, or log-prob per character when ``normalise``)."""
    if normalise and choices is not None:
        logprobs = [lp / max(1, len(c)) for lp, c in zip(logprobs, choices)]
    return max(range(len(logprobs)), key=lambda i: logprobs[i])


def task_accuracy(model, enc, normalise: bool, tok=None, desc: str | None = None) -> dict:
    correct = 0
    for ctx, conts, label in tqdm(enc, desc=desc, disable=desc is None, leave=False):
        lps = choice_logprobs(model, ctx, conts)
        texts = [tok.decode(c) for c in conts] if normalise else None
        correct += score_choices(lps, texts, normalise) == label
    return {"accuracy": correct / max(1, len(enc)), "items": len(enc), "correct": correct}


class _Usage:
    """Per-layer counters of one evaluation segment, read from the expert layers."""

    def __init__(self, model):
        self.layers, self.projections = ffn_layers(model), projection_layers(model)
        for m in self.layers + self.projections:
            m.tokens = m.pairs = 0
        for m in self.layers:
            m.record, m.per_token = True, []

    def read(self) -> dict:
        out = {"tokens": [m.tokens for m in self.layers], "pairs": [m.pairs for m in self.layers],
               "hist": [torch.bincount(torch.cat(m.per_token).long(), minlength=m.num_experts + 1).tolist()
                        if m.per_token else [0] * (m.num_experts + 1) for m in self.layers]}
        if self.projections:  # FLOPs over this segment's tokens (a multiply-add is 2 FLOPs)
            ps = self.projections
            out["projections"] = {
                "executed": sum(2 * m.pairs * m.flops_per_pair for m in ps),
                "all_experts": sum(2 * m.tokens * m.num_experts * m.flops_per_pair for m in ps),
                "router": sum(2 * m.tokens * m.t["router.in_proj.weight"].shape[0]
                              * (m.t["router.in_proj.weight"].shape[1] + m.num_experts) for m in ps),
                "replaced_dense": sum(2 * m.tokens * m.t["experts.w_in"].shape[2] * m.t["experts.w_out"].shape[2]
                                      for m in ps)}
        for m in self.layers:
            m.record, m.per_token = False, []
        return out


def measure(model, data: EvalData, opts: EvalOptions, tok, flops: dict | None, label: str) -> dict:
    """Quality (and, for an expert model, cost and usage) of ``model`` on ``data``."""
    result: dict = {"ppl": {}, "tasks": {}}
    segments = {}
    moe = bool(expert_layers(model))
    for c, seqs in data.corpora.items():
        usage = _Usage(model) if moe else None
        result["ppl"][c] = perplexity(model, seqs, batch=opts.batch, desc=f"{label}: perplexity {c}")
        if usage:
            segments[c] = usage.read()
    for t, enc in data.tasks.items():
        usage = _Usage(model) if moe else None
        result["tasks"][t] = task_accuracy(model, enc, LENGTH_NORMALISED[t], tok, desc=f"{label}: {t}")
        if usage:
            segments[t] = usage.read()
    if not moe:
        result.update(ffn_compute=1.0, model_compute=1.0, model_compute_without_lm_head=1.0)
        return result
    L = len(ffn_layers(model))
    tokens = [sum(s["tokens"][i] for s in segments.values()) for i in range(L)]
    pairs = [sum(s["pairs"][i] for s in segments.values()) for i in range(L)]
    proj = None
    if projection_layers(model):
        proj = {k: sum(s["projections"][k] for s in segments.values()) for k in next(iter(segments.values()))["projections"]}
        result["projection_compute"] = proj["executed"] / proj["all_experts"]
    result["ffn_compute"], result["model_compute"] = compute_fractions(flops, tokens, pairs, proj)
    result["model_compute_without_lm_head"] = compute_without_lm_head(
        flops, result["ffn_compute"], (proj["executed"] + proj["router"] - proj["replaced_dense"]) / tokens[0] if proj else 0.0)
    result["by_data"] = {name: dict(zip(("ffn_compute", "model_compute"),
                                        compute_fractions(flops, s["tokens"], s["pairs"], s.get("projections"))))
                         for name, s in segments.items()}
    hist = [[sum(s["hist"][i][k] for s in segments.values()) for k in range(len(segments[next(iter(segments))]["hist"][i]))]
            for i in range(L)]
    result["usage"] = {
        "tokens_per_layer": tokens[0],
        "experts_per_token_hist": hist,   # [layer][k]: tokens that executed k experts in that layer
        "mean_experts_per_token": [p / max(1, t) for p, t in zip(pairs, tokens)],
        "num_experts": [len(h) - 1 for h in hist],
    }
    return result


# ---------------------------------------------------------------- driver

def evaluate(dense_path: str | Path, checkpoints: list[str | Path], opts: EvalOptions = EvalOptions(),
             out: str | Path | None = None, progress: bool = True, resume: bool = False,
             deadline: float | None = None, title: str = "") -> dict:
    """Sweep every checkpoint; returns (and, with ``out``, writes as JSON after each point, with the
    plots beside it) ``{"dense": {...}, "points": [...], "data": ..., "flops_per_token": ...}``.

    ``resume``: keep the dense result and the points already in ``out`` when it was written with the
    same options and checkpoints. ``deadline`` (a ``time.time()`` value): start no new point after it
    (the result then lacks the rest; ``"complete": false``)."""
    check_options(opts)
    if not checkpoints and not opts.dense:
        raise ValueError("nothing to evaluate: give checkpoints, or evaluate the dense model")
    dense = load_dense(dense_path)
    ckpts = [load_checkpoint(c, dense) for c in checkpoints]   # all refused before any forward
    device = resolve_device(opts.device)
    tok = load_tokenizer(dense)
    data = prepare_data(dense, opts, tok)
    result: dict = {
        "dense_model": str(dense_path), "checkpoints": [str(c.path) for c in ckpts],
        "options": json.loads(json.dumps(asdict(opts))),   # as it reads back from the JSON (for resume)
        "data": data.info, "flops_per_token": flops_per_token(dense.config, opts.seq_len),
        "dense": None, "points": [],
    }
    out = Path(out) if out is not None else None
    old_seconds = 0.0
    if resume and out is not None and out.is_file():
        old = json.loads(out.read_text())
        if old.get("options") == result["options"] and old.get("checkpoints") == result["checkpoints"] \
                and old.get("dense_model") == result["dense_model"]:
            result["dense"], result["points"] = old.get("dense"), old.get("points", [])
            old_seconds = float(old.get("seconds") or 0.0)
    done = {(p["checkpoint"], p["setting"]) for p in result["points"]}
    result["complete"] = False

    def save():
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))

    t0 = time.time()
    if opts.dense and result["dense"] is None:
        model = build_model(dense, device=device)
        result["dense"] = measure(model, data, opts, tok, None, "dense")
        del model
        save()
    todo = [(c, s) for c in ckpts for s in settings_for(c, opts) if (str(c.path), s[0]) not in done]
    bar = tqdm(total=len(todo), desc="d2dmoe-eval: sweep points", disable=not progress)
    for ckpt in ckpts:
        flops = flops_per_token(ckpt.config, opts.seq_len, ckpt.d2dmoe)
        result.setdefault("flops_per_token_moe", {})[str(ckpt.path)] = flops
        settings = [s for s in settings_for(ckpt, opts) if (str(ckpt.path), s[0]) not in done]
        if not settings or (deadline is not None and time.time() > deadline):
            continue
        model = build_moe(ckpt, dense, device)
        for label, tau, top_k, oracle, layer_tau in settings:
            if deadline is not None and time.time() > deadline:
                break
            set_selection(model, tau=tau, top_k=top_k, oracle=oracle, layer_tau=layer_tau)
            method = ckpt.method + ("-oracle" if oracle else "")
            point = {"method": method, "setting": label, "tau": tau, "top_k": top_k, "checkpoint": str(ckpt.path),
                     **({"layer_tau": list(layer_tau)} if layer_tau else {}), **dict(opts.tags)}
            point.update(measure(model, data, opts, tok, flops, f"{method} {label}"))
            result["points"].append(point)
            save()
            bar.update()
        del model
    bar.close()
    result["complete"] = len(result["points"]) == sum(len(settings_for(c, opts)) for c in ckpts)
    result["seconds"] = round(time.time() - t0 + old_seconds, 1)
    save()
    if out is not None:
        plot_all(result, out, title)
    return result


# ---------------------------------------------------------------- reporting

def _metrics(result: dict) -> list[tuple[str, str, str]]:
    """(kind, name, axis label) of every quality number, from the first measured entry."""
    ref = result["dense"] or result["points"][0]
    data = result.get("data", {})
    out = [("ppl", c, f"perplexity: {c} ({data.get('corpora', {}).get(c, {}).get('tokens', '?')} tokens)")
           for c in ref["ppl"]]
    out += [("tasks", t, f"accuracy: {t} ({ref['tasks'][t]['items']} items)") for t in ref["tasks"]]
    return out


def _value(entry: dict, kind: str, name: str) -> float:
    return entry[kind][name] if kind == "ppl" else entry[kind][name]["accuracy"]


def quality_curves(points: list[dict], x_key: str) -> list[tuple[str, str, list[dict]]]:
    """(label, method, points sorted by ``x_key``): one curve per method, or per checkpoint where a
    method has several (e.g. the same model split into experts of different sizes), named after it."""
    by_method: dict[str, dict[str, list[dict]]] = {}
    for p in points:
        by_method.setdefault(p["method"], {}).setdefault(p.get("checkpoint"), []).append(p)
    curves = []
    for method, by_ckpt in by_method.items():
        names = distinct_names(list(by_ckpt))
        curves += [(method if len(by_ckpt) == 1 else f"{method} ({names[ckpt]})", method,
                    sorted(pts, key=lambda p: p[x_key])) for ckpt, pts in by_ckpt.items()]
    return curves


def distinct_names(paths: list[str | None]) -> dict[str | None, str]:
    """Each path's shortest tail of components that no other path shares (``run-a/ckpt``, ``run-b/ckpt``
    for two checkpoints both named ``ckpt``)."""
    parts = {p: Path(str(p)).parts[1 if Path(str(p)).anchor else 0:] for p in paths}  # no root component
    out = {}
    for p in paths:
        n = 1
        while n < len(parts[p]) and any(q != p and parts[q][-n:] == parts[p][-n:] for q in paths):
            n += 1
        out[p] = "/".join(parts[p][-n:])
    return out


def plot_quality(result: dict, path: str | Path, x_key: str = "model_compute", title: str = "") -> None:
    """One panel per quality number, quality against compute, one curve per method (``quality_curves``),
    dense dotted; and, when the experts were cut from a fine-tuned copy, the model before fine-tuning
    (``original``) dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _metrics(result)
    cols = min(3, len(metrics))
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (kind, name, label) in zip(axes.flat, metrics):
        for curve, method, pts in quality_curves(result["points"], x_key):
            style, color = METHOD_STYLE.get(method, ("^-", None))
            ax.plot([p[x_key] for p in pts], [_value(p, kind, name) for p in pts], style,
                    color=color if curve == method else None, label=curve)
        if result["dense"] is not None:
            ax.axhline(_value(result["dense"], kind, name), color="gray", ls=":", lw=1.2, label="dense")
        if result.get("original") is not None:
            ax.axhline(_value(result["original"], kind, name), color="black", ls="--", lw=1,
                       label="original (before sparsification)")
        if kind == "tasks":
            chance = result.get("data", {}).get("tasks", {}).get(name, {}).get("chance")
            if chance:
                ax.axhline(chance, color="lightgray", ls="-.", lw=1, label="chance")
        ax.set_yscale("log" if kind == "ppl" else "linear")
        ax.set_xlabel("executed FFN compute (fraction of dense)" if x_key == "ffn_compute"
                      else "model compute (fraction of dense)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_usage(result: dict, path: str | Path, title: str = "") -> None:
    """Heat-maps, one per sweep point: layer x experts executed per token, colour = share of tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    pts = [p for p in result["points"] if "usage" in p]
    if not pts:
        return
    cols = min(4, len(pts))
    rows = -(-len(pts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.8 * cols, 3.2 * rows), squeeze=False)
    for ax, p in zip(axes.flat, pts):
        h = np.array(p["usage"]["experts_per_token_hist"], dtype=float)
        h = h / np.maximum(1, h.sum(1, keepdims=True))
        im = ax.imshow(h, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=max(0.05, h.max()),
                       interpolation="nearest")
        ax.plot(p["usage"]["mean_experts_per_token"], range(len(h)), "r|", ms=5, mew=1.5)
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(f"{p['method']} {p['setting']}\nFFN {p['ffn_compute']:.0%}, model {p['model_compute']:.0%}",
                     fontsize=8)
        ax.set_xlabel("experts executed per token", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).set_label("share of tokens", fontsize=7)
    for ax in list(axes.flat)[len(pts):]:
        ax.axis("off")
    fig.suptitle(title or "experts executed per token, per layer (colour: share of tokens; red marks: mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    return {"quality": Path(f"{stem}-quality.png"), "quality_ffn": Path(f"{stem}-quality-ffn.png"),
            "usage": Path(f"{stem}-usage.png")}


def plot_all(result: dict, out: Path, title: str = "") -> dict[str, Path]:
    paths = plot_paths(out)
    title = title or f"{Path(result['dense_model']).name}: quality vs compute"
    plot_quality(result, paths["quality"], "model_compute", title)
    plot_quality(result, paths["quality_ffn"], "ffn_compute", title)
    plot_usage(result, paths["usage"])
    return paths


def format_table(result: dict) -> str:
    metrics = _metrics(result)
    names = [("ppl " if k == "ppl" else "") + n for k, n, _ in metrics]
    head = f"{'method':12s} {'setting':10s} {'FFN':>6s} {'model':>6s} {'no-head':>7s} " + " ".join(f"{n:>10s}" for n in names)
    rows = [head, "-" * len(head)]
    entries = ([("dense", "", result["dense"])] if result["dense"] else []) + \
              [(p["method"], p["setting"], p) for p in result["points"]]
    for method, setting, e in entries:
        vals = " ".join(f"{_value(e, k, n):10.3f}" if k == "tasks" else f"{_value(e, k, n):10.2f}" for k, n, _ in metrics)
        no_head = e.get("model_compute_without_lm_head", float("nan"))
        rows.append(f"{method:12s} {setting:10s} {e['ffn_compute']:6.1%} {e['model_compute']:6.1%} {no_head:7.1%} {vals}")
    ref = result["dense"] or result["points"][0]
    rows.append("FFN / model: executed fraction of dense FFN / whole-model FLOPs per token (no-head: without the "
                "LM head); ppl: perplexity; tasks: accuracy. items: " + ", ".join(f"{t} {v['items']}" for t, v in ref["tasks"].items())
                + "; tokens: " + ", ".join(f"{c} {v['tokens']}" for c, v in result.get("data", {}).get("corpora", {}).items()))
    return "\n".join(rows)


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parser() -> argparse.ArgumentParser:
    d = EvalOptions()
    ap = argparse.ArgumentParser(prog="d2dmoe-eval", description=__doc__.split("\n\n")[0] + " Sweeps tau (D2DMoE) and "
                                 "k (MoEfication), measures compute, perplexity, zero-shot accuracy and expert usage; "
                                 "writes JSON and PNG plots.")
    ap.add_argument("dense", help="the dense checkpoint the D2DMoE checkpoints were converted from (HF dir or .gguf)")
    ap.add_argument("checkpoints", nargs="*", help="D2DMoE checkpoint directories (d2dmoe-convert output)")
    ap.add_argument("--out", type=Path, default=Path("quality.json"),
                    help="result JSON (plots beside it: <stem>-quality.png, -quality-ffn.png, -usage.png)")
    ap.add_argument("--taus", type=_floats, default=d.taus, help="tau values for D2DMoE checkpoints, comma-separated")
    ap.add_argument("--top-k-fractions", type=_floats, default=d.top_k_fractions,
                    help="fractions of experts per token for MoEfication checkpoints (k = round(f x E))")
    ap.add_argument("--corpora", type=_names, default=d.corpora, help=f"held-out text, some of {','.join(CORPORA)}")
    ap.add_argument("--tokens", type=int, default=d.tokens, help=f"tokens per corpus (default {d.tokens})")
    ap.add_argument("--tasks", type=_names, default=d.tasks, help=f"zero-shot tasks, some of {','.join(TASKS)} "
                    "('' for none)")
    ap.add_argument("--items", type=int, default=d.items, help=f"items per task (default {d.items})")
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--max-item-tokens", type=int, default=d.max_item_tokens)
    ap.add_argument("--batch", type=int, default=d.batch, help="perplexity sequences per forward")
    ap.add_argument("--device", default=d.device, help="auto (GPU if present), cpu, cuda[:N]")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense reference")
    ap.add_argument("--title", default="", help="plot title (default: the dense model's name)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the points already in --out (written with the same options and checkpoints)")
    ap.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE",
                    help="written on every point, e.g. conversion=cpu-default")
    ap.add_argument("--oracle", action="store_true",
                    help="also sweep D2DMoE checkpoints selecting on the true expert output norms (method "
                         "'d2dmoe-oracle'): how much of the loss is the routers' error")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        tags = tuple(tuple(t.split("=", 1)) for t in args.tag)
        if any(len(t) != 2 for t in tags):
            raise ValueError(f"--tag takes KEY=VALUE, got {args.tag}")
        opts = EvalOptions(taus=args.taus, top_k_fractions=args.top_k_fractions, corpora=args.corpora,
                           tokens=args.tokens, tasks=args.tasks, items=args.items, seq_len=args.seq_len,
                           max_item_tokens=args.max_item_tokens, batch=args.batch, device=args.device,
                           dense=not args.no_dense, tags=tags, oracle=args.oracle)
        result = evaluate(args.dense, args.checkpoints, opts, out=args.out, resume=args.resume, title=args.title)
    except (CheckpointError, CorpusError, ValueError, FileExistsError) as err:
        print(f"d2dmoe-eval: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"d2dmoe-eval: wrote {args.out} and " + ", ".join(str(p) for p in plot_paths(args.out).values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
