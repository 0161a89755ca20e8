"""Conversion driver: dense checkpoint -> D2DMoE checkpoint, in resumable stages.

    sparsify (optional) -> split -> routers -> attention (optional) -> calibrate -> adapt (optional) -> export

Each stage is its own module; this file wires them: options, the work directory (see ``workdir``),
the final report. Everything that can be refused (unknown architecture, unreadable file, budget out
of range, a corpus too small for the steps asked) is refused before anything is written. The
output directory appears only when everything succeeded: the checkpoint is staged beside it,
validated by the plugin's own validator, then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from d2dmoe_converter.adapt import AdaptOptions, select_experts_in_ffns_
from d2dmoe_converter.attention import (AttentionOptions, convert_attention, dense_projection_names,
                                        load_projection_state, projection_specs, resolve_projections)
from d2dmoe_converter.calibrate import (CalibrateOptions, calibrate, check_budget, heldout_sequences, measure_quality,
                                       scale_to_budget)
from d2dmoe_converter.corpus import load_corpus, token_sequences
from d2dmoe_converter.dense import DenseModel, load_dense, load_tokenizer
from d2dmoe_converter.hf_model import build_model, relu_config, state_dict_for_export
from d2dmoe_converter.kmeans import balanced_kmeans_order
from d2dmoe_converter.moe_model import attach_experts, perplexity
from d2dmoe_converter.routers import (METHODS, RouterOptions, capture_ffn_inputs, ffn_input_paths, load_routers,
                                      train_routers)
from d2dmoe_converter.sparsify import ACTIVATIONS, SparsifyOptions, finetune, hoyer_activations_, plot_log
from d2dmoe_converter.split import coactivation_order, contiguous_order, dense_ffn, dense_ffn_names, dense_hidden, split_ffn
from d2dmoe_converter.teacher_text import check_prompt, check_share, engine_for, teacher_text
from d2dmoe_converter.workdir import Stage, fingerprint, write_json
from d2dmoe_kernels.reference import REFERENCES
from d2dmoe_vllm.checkpoint import layer_prefix, validate_checkpoint
from d2dmoe_vllm.config import ARCHITECTURES, FORMAT_VERSION, CheckpointError, D2DMoEConfig, check_tau

SPLITS = ("kmeans", "coactivation", "contiguous")
ADAPT_MEASURES = ("ppl_dense", "ppl_converted", "ffn_fraction", "layer_fraction", "experts_per_token_mean")
SPLIT_SEQ_LEN = 256
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "gelu_fast": "gelu_tanh"}


@dataclass(frozen=True)
class ConvertOptions:
    expert_size: int | None = None   # neurons per expert; default: d_ff / 32 experts
    num_experts: int | None = None
    relufy: bool = False             # ReLU for the FFN activation (GPT-2) / gate (Gemma); implied by sparsify (relu, anneal)
    split: str = "coactivation"      # balanced k-means on activation profiles over split_tokens ("coactivation"),
                                     # on normalised first-layer rows ("kmeans", the paper's), or "contiguous"
    split_tokens: int = 8192         # training tokens whose activations group the neurons (coactivation)
    method: str = "d2dmoe"           # "d2dmoe" (regression routers, dynamic k) or "moefication" (top-k)
    tau: float = 0.0                 # kept when no budget is given
    dtype: str = "auto"
    seed: int = 0
    overwrite: bool = False
    work_dir: str | None = None      # default: <output>.work beside the output
    corpus: str | None = None        # default: State of the Union (see corpus.py)
    heldout: str | None = None
    device: str = "auto"             # "auto": the GPU when there is one
    sparsify: SparsifyOptions = field(default_factory=SparsifyOptions)
    routers: RouterOptions = field(default_factory=RouterOptions)
    calibrate: CalibrateOptions = field(default_factory=CalibrateOptions)
    attention: AttentionOptions = field(default_factory=AttentionOptions)
    adapt: AdaptOptions = field(default_factory=AdaptOptions)


def dense_activation(dense: DenseModel) -> str:
    cfg = dense.config
    if dense.model_type == "gpt2":
        name = cfg.get("activation_function", "gelu_new")
    elif cfg.get("hidden_activation") == "relu":
        name = "relu"
    else:  # Gemma's GeGLU uses the tanh approximation whatever hidden_act says (as HF and vLLM do)
        name = cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if name not in _HF_ACTIVATIONS:
        raise CheckpointError(f"dense checkpoint: activation {name!r} is not supported. "
                              f"Fix: use a model with one of {sorted(_HF_ACTIVATIONS)}, or convert with --relu (or "
                              f"--sparsify-steps N with --sparsify-activation relu or anneal)")
    return _HF_ACTIVATIONS[name]


def expert_counts(d_ff: int, opts: ConvertOptions) -> tuple[int, int]:
    if opts.expert_size and opts.num_experts:
        raise ValueError("give --expert-size or --num-experts, not both")
    size = opts.expert_size or (d_ff // opts.num_experts if opts.num_experts else d_ff // 32)
    if size <= 0 or d_ff % size or (opts.num_experts and size * opts.num_experts != d_ff):
        raise ValueError(f"expert size {size} does not divide the FFN width d_ff = {d_ff}; "
                         f"pick a divisor of {d_ff}")
    return d_ff // size, size


def moe_config(dense: DenseModel, opts: ConvertOptions, tau: float = 0.0, top_k: int = 0,
               layer_tau: tuple[float, ...] = ()) -> D2DMoEConfig:
    E, e = expert_counts(dense.d_ff, opts)
    L = dense.num_layers
    projections = projection_specs(dense, resolve_projections(dense.model_type, opts.attention.projections),
                                   opts.attention)
    return D2DMoEConfig(
        format_version=FORMAT_VERSION, tau=check_tau(tau, "--tau"), top_k=top_k, activation=dense_activation(dense),
        gated=dense.model_type != "gpt2", expert_modules=("mlp", *(p.name for p in projections)), d_ff=dense.d_ff,
        num_experts=(E,) * L, expert_size=(e,) * L, router_width=opts.routers.width, projections=projections,
        layer_tau=layer_tau, reference=opts.calibrate.reference if opts.method == "d2dmoe" else "max",
    )


def check_options(opts: ConvertOptions) -> None:
    """Refuse bad options before anything is read or written."""
    if opts.dtype not in DTYPES:
        raise ValueError(f"--dtype {opts.dtype!r}: use one of {list(DTYPES)}")
    if opts.split not in SPLITS:
        raise ValueError(f"--split {opts.split!r}: use one of {list(SPLITS)}")
    if opts.method not in METHODS:
        raise ValueError(f"--method {opts.method!r}: use one of {list(METHODS)}")
    check_tau(opts.tau, "--tau")
    check_budget(opts.calibrate.budget)
    if opts.calibrate.per_layer and (opts.method != "d2dmoe" or opts.calibrate.budget is None):
        raise ValueError("--tau-per-layer calibrates a D2DMoE tau per layer to a compute budget: it needs "
                         "--budget and --method d2dmoe")
    if opts.calibrate.reference not in REFERENCES:
        raise ValueError(f"--reference {opts.calibrate.reference!r}: use one of {list(REFERENCES)}")
    if opts.calibrate.reference != "max" and opts.method != "d2dmoe":
        raise ValueError("--reference sets what dynamic-k's tau is a fraction of: it needs --method d2dmoe "
                         "(MoEfication runs a fixed top-k)")
    if opts.method == "moefication" and opts.calibrate.budget is None:
        raise ValueError("--method moefication needs --budget: it sets the fixed k = budget x experts")
    if opts.routers.width <= 0:
        raise ValueError(f"--router-width must be positive, got {opts.routers.width}")
    for name, value in (("--sparsify-steps", opts.sparsify.steps), ("--router-steps", opts.routers.steps)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    check_share(opts.sparsify.generated)
    if opts.sparsify.activation not in ACTIVATIONS:
        raise ValueError(f"--sparsify-activation {opts.sparsify.activation!r}: use one of {', '.join(ACTIVATIONS)}")
    if opts.relufy and opts.sparsify.steps and opts.sparsify.activation == "keep":
        raise ValueError("--relu with --sparsify-activation keep: the first replaces the activation the second keeps. "
                         "Fix: drop one of them")
    if opts.sparsify.generated_engines < 1:
        raise ValueError(f"--sparsify-generated-engines must be at least 1, got {opts.sparsify.generated_engines}")
    if opts.sparsify.generated:
        check_prompt(opts.sparsify.generated_prompt, opts.sparsify.seq_len)
        engine_for(torch.device("cpu"), opts.sparsify.generated_engine)  # a bad or missing engine, before any work
    if not 0 <= opts.sparsify.distill <= 1:
        raise ValueError(f"--sparsify-distill is a weight in [0, 1], got {opts.sparsify.distill}")
    for name, value in (("--sparsify-passes", opts.sparsify.passes), ("--sparsify-batch", opts.sparsify.batch),
                        ("--sparsify-accum", opts.sparsify.accum), ("--seq-len", opts.sparsify.seq_len), ("--router-tokens", opts.routers.tokens),
                        ("--router-batch", opts.routers.batch), ("--calib-tokens", opts.calibrate.tokens),
                        ("--eval-tokens", opts.calibrate.eval_tokens),
                        ("--sensitivity-tokens", opts.calibrate.sensitivity_tokens), ("--split-tokens", opts.split_tokens)):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    at = opts.attention
    if at.projections:
        if opts.method != "d2dmoe":
            raise ValueError("--attention-experts is a D2DMoE (dynamic-k) feature: convert --method moefication "
                             "without it")
        for name, value in (("--attn-expert-size", at.expert_size), ("--attn-tokens", at.tokens),
                            ("--attn-batch", at.batch), ("--attn-cost", at.cost)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if at.steps < 0:
            raise ValueError(f"--attn-steps must be >= 0, got {at.steps}")
    ad = opts.adapt
    if ad.steps < 0:
        raise ValueError(f"--adapt-steps must be >= 0, got {ad.steps}")
    if ad.steps:
        if opts.routers.steps <= 0 and opts.calibrate.budget is None:
            raise ValueError("--adapt-steps fine-tunes the model under its routers' selection at the calibrated tau: "
                             "it needs trained routers (--router-steps > 0) or a --budget. Fix: pass them, or drop "
                             "--adapt-steps")
        if at.projections:
            raise ValueError("--adapt-steps with --attention-experts: adapt trains the FFN experts only, with the "
                             "attention projections dense. Fix: drop one of them")
        if not 0 <= ad.distill <= 1:
            raise ValueError(f"--adapt-distill is a weight in [0, 1], got {ad.distill}")
        for name, value in (("--adapt-batch", ad.batch), ("--adapt-accum", ad.accum), ("--seq-len", ad.seq_len),
                            ("--adapt-passes", ad.passes), ("--adapt-save-every", ad.save_every)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
    if opts.device not in ("auto", "cpu", "cuda") and not opts.device.startswith("cuda:"):
        raise ValueError(f"--device {opts.device!r}: use auto, cpu or cuda[:N]")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible. Fix: use --device cpu (or auto)")
    return torch.device(name)


def source_id(src: Path) -> list:
    """What identifies the input for the stage fingerprints: paths, sizes, modification times."""
    if not src.exists():
        return [str(src)]  # load_dense names the problem
    files = [src] if src.is_file() else sorted(p for p in src.iterdir() if p.suffix in (".json", ".safetensors"))
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def init_router(hidden: int, width: int, num_experts: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Untrained router (Kaiming-uniform like nn.Linear), for --router-steps 0."""
    def linear(out_f, in_f):
        bound = in_f ** -0.5
        return (torch.rand(out_f, in_f, generator=gen) * 2 - 1) * bound
    return {"router.in_proj.weight": linear(width, hidden), "router.out_proj.weight": linear(num_experts, width)}


def layer_experts(dense: DenseModel, cfg: D2DMoEConfig, orders: dict[str, torch.Tensor]) -> list[dict]:
    """Per layer, the expert tensors (names relative to ``...mlp.``) of the split."""
    return [split_ffn(dense_ffn(dense, i), orders[f"layer_{i}"], cfg.num_experts[i]) for i in range(dense.num_layers)]


def expert_state(dense: DenseModel, experts: list[dict], routers: list[dict]) -> dict[str, torch.Tensor]:
    """Every expert layer's tensors (experts + router) under their checkpoint names."""
    state = {}
    for i, (ex, router) in enumerate(zip(experts, routers)):
        p = layer_prefix(dense.model_type, i) + "mlp."
        state.update({p + k: v for k, v in {**ex, **router}.items()})
    return state


def export_state(dense: DenseModel, experts: list[dict], routers: list[dict], dtype_name: str,
                 projections: dict[str, torch.Tensor] | None = None, replaced: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors: dense ones, minus the FFNs (and ``replaced`` attention projections,
    whose expert tensors are ``projections``), plus the expert layers."""
    state = dict(dense.state)
    for i in range(dense.num_layers):
        for name in dense_ffn_names(dense, i) + [n for p in replaced for n in dense_projection_names(dense, i, p)]:
            del state[name]
    state.update(expert_state(dense, experts, routers))
    state.update(projections or {})
    dtype = DTYPES[dtype_name] or next(v.dtype for v in dense.state.values() if v.is_floating_point())
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def export_config(dense: DenseModel, cfg: D2DMoEConfig, dtype: torch.dtype) -> dict:
    hf = {k: v for k, v in dense.config.items() if k not in ("auto_map", "quantization_config", "_name_or_path")}
    hf["architectures"] = [moe_architecture(dense.model_type)]
    hf.pop("torch_dtype", None)
    hf["dtype"] = str(dtype).removeprefix("torch.")
    hf["d2dmoe"] = cfg.to_dict()
    return hf


def moe_architecture(model_type: str) -> str:
    """The class a D2DMoE checkpoint's ``architectures`` names (``D2DMoEGemma3ForCausalLM``)."""
    return next(a for a, (t, _) in ARCHITECTURES.items() if t == model_type)


def hf_architecture(model_type: str) -> str:
    """The plain Hugging Face class of the dense stages (``Gemma3ForCausalLM``), which vLLM and
    transformers serve."""
    return moe_architecture(model_type).removeprefix("D2DMoE")


def eos_ids(dense: DenseModel) -> list[int]:
    """The end-of-text ids teacher text must not sample (the config's, else the tokenizer's)."""
    eos = dense.config.get("eos_token_id")
    if eos is None:
        eos = load_tokenizer(dense).eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def save_dense(dense_cfg: dict, state: dict[str, torch.Tensor], tokenizer_of: DenseModel, dest: Path) -> None:
    """A Hugging Face model directory (config.json + safetensors + tokenizer). A config read from a GGUF
    names no architecture; without one vLLM would load the directory as an embedding model."""
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = {k: v for k, v in dense_cfg.items() if k not in ("quantization_config", "auto_map", "_name_or_path")}
    if not cfg.get("architectures"):
        cfg["architectures"] = [hf_architecture(cfg["model_type"])]
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer_of.save_tokenizer(dest)


@dataclass
class TextData:
    sparsify: torch.Tensor | None = None
    routers: torch.Tensor | None = None
    calib: torch.Tensor | None = None
    heldout: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    split: torch.Tensor | None = None
    adapt: torch.Tensor | None = None
    corpus: str = ""


def prepare_text(dense: DenseModel, opts: ConvertOptions, measure: bool) -> TextData:
    """Token sequences for every stage that needs text, cut up front so a corpus too small for
    what was asked is refused before any stage runs."""
    sp, ro, ca, at, ad = opts.sparsify, opts.routers, opts.calibrate, opts.attention, opts.adapt
    coactivation = opts.split == "coactivation"
    if not (sp.steps or ro.steps or measure or at.projections or coactivation or ad.steps):
        return TextData()
    corpus = load_corpus(opts.corpus, opts.heldout)
    tok = load_tokenizer(dense)
    bos = dense.bos_token_id(tok)
    data = TextData(corpus=corpus.name)
    if sp.steps:
        data.sparsify = token_sequences(tok, corpus.train, sp.steps * sp.accum * sp.batch, sp.seq_len, bos=bos,
                                        shuffle_seed=opts.seed, what=f"sparsify ({sp.steps} steps x {sp.accum} x {sp.batch})",
                                        passes=sp.passes)
    if ro.steps:
        data.routers = token_sequences(tok, corpus.train, -(-ro.tokens // ro.seq_len), ro.seq_len, bos=bos,
                                       shuffle_seed=opts.seed + 1, what=f"routers ({ro.tokens} tokens)")
    if at.projections:
        data.attention = token_sequences(tok, corpus.train, -(-at.tokens // at.seq_len), at.seq_len, bos=bos,
                                         shuffle_seed=opts.seed + 2, what=f"attention experts ({at.tokens} tokens)")
    if coactivation:
        data.split = token_sequences(tok, corpus.train, -(-opts.split_tokens // SPLIT_SEQ_LEN), SPLIT_SEQ_LEN, bos=bos,
                                     shuffle_seed=opts.seed + 3, what=f"split by co-activation ({opts.split_tokens} tokens)",
                                     fix="lower --split-tokens, pass a larger corpus, or split by the weights "
                                         "(--split kmeans), which reads no text")
    if ad.steps:
        data.adapt = token_sequences(tok, corpus.train, ad.steps * ad.accum * ad.batch, ad.seq_len, bos=bos,
                                     shuffle_seed=opts.seed + 4, what=f"adapt ({ad.steps} steps x {ad.accum} x {ad.batch})",
                                     passes=ad.passes, fix="ask for fewer adapt steps, allow more passes over the text "
                                                           "(--adapt-passes), or pass a larger corpus")
    if measure:
        data.calib, data.heldout = heldout_sequences(tok, corpus.heldout, ca, bos)
    return data


def convert(src: str | Path, dst: str | Path, opts: ConvertOptions = ConvertOptions()) -> dict:
    """Convert ``src`` (HF dir or .gguf) into the D2DMoE checkpoint directory ``dst``; returns a report."""
    src, dst = Path(src), Path(dst)
    check_options(opts)
    if dst.exists() and any(dst.iterdir()) and not opts.overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose another output or pass --overwrite")
    t_start = time.time()
    work = Path(opts.work_dir) if opts.work_dir else dst.with_name(dst.name + ".work")
    fp = fingerprint(source_id(src))
    # A GGUF is dequantised once (slow) and kept in the work dir as a safetensors model (fast to reload).
    gguf_stage = Stage(work, "dense", fp) if src.is_file() and src.suffix == ".gguf" else None
    dense = load_dense(gguf_stage.dir if gguf_stage is not None and gguf_stage.done else src)
    source = dense
    relu = opts.relufy or opts.sparsify.relu
    if relu:
        dense = DenseModel(relu_config(dense.config), dense.state, dense.source, dense.tokenizer)
    moe_config(dense, opts)  # sizes checked before any work
    device = resolve_device(opts.device)
    budget = opts.calibrate.budget
    measure = opts.routers.steps > 0 or budget is not None
    text = prepare_text(dense, opts, measure)
    work.mkdir(parents=True, exist_ok=True)
    seconds = {"load": round(time.time() - t_start, 1)}
    if gguf_stage is not None and not gguf_stage.done:
        save_dense(source.config, source.state, source, gguf_stage.begin())
        gguf_stage.finish({"source": str(src), "seconds": seconds["load"]})
    fp = fingerprint(fp, relu)

    def timed(stage: Stage, run) -> dict:
        if stage.done:
            info = stage.info()
            print(f"[{stage.name}] done earlier ({info.get('seconds', '?')} s): skipped")
            seconds[stage.name] = f"skipped (took {info.get('seconds', '?')} s)"
            return info
        t0 = time.time()
        report = run(stage.begin())
        report["seconds"] = round(time.time() - t0, 1)
        seconds[stage.name] = report["seconds"]
        return stage.finish(report)

    # 1. sparsify: ReLU-fication (or the own activation kept / annealed into ReLU) + square-Hoyer fine-tuning
    # (optional), on text partly the teacher's (optional)
    if opts.sparsify.steps:
        sp = opts.sparsify
        key = [fp, sp.stage_key(), opts.seed, text.corpus]
        if sp.generated:  # the teacher's text is sampled once, for what decides it: not for lr or alpha
            engine = engine_for(device, sp.generated_engine)
            gen_stage = Stage(work, "teacher_text", fingerprint(fp, sp.text_key(), opts.seed, text.corpus, engine))
            key.append(gen_stage.fingerprint)
        stage = Stage(work, "sparsify", fingerprint(*key))

        def run_teacher_text(part: Path) -> dict:
            model = build_model(source, device=device).eval() if engine == "transformers" else None
            ids = teacher_text(text.sparsify, sp.generated, sp.generated_prompt, opts.seed, part, engine=engine,
                               model=model, model_dir=gguf_stage.dir if gguf_stage is not None else src,
                               eos=eos_ids(source), device=device, engines=sp.generated_engines)
            del model
            save_file({"ids": ids}, str(part / "text.safetensors"))
            for chunk in part.glob("chunk_*.safetensors"):
                chunk.unlink()
            changed = int((ids != text.sparsify).any(dim=1).sum())
            return {"engine": engine, "sequences": ids.shape[0], "generated": round(sp.generated * ids.shape[0]),
                    "changed": changed, "prompt": sp.generated_prompt}

        train_ids = text.sparsify
        if sp.generated and not stage.done:  # a finished sparsify stage needs no text
            timed(gen_stage, run_teacher_text)
            train_ids = load_file(str(gen_stage.dir / "text.safetensors"))["ids"]

        def run_sparsify(part: Path) -> dict:
            model = build_model(dense if sp.activation == "relu" else source, device=device)  # keep / anneal: own act
            teacher = build_model(source, device=device).requires_grad_(False).eval() if sp.distill else None
            hoyer_activations_(model, sp.activation)
            log = finetune(model, train_ids, sp, part / "train_state.pt", teacher)
            del teacher
            save_dense(dense.config, state_dict_for_export(model), dense, part)
            plot_log(log["log"], part / "sparsify.png", sp.activation)
            (part / "train_state.pt").unlink(missing_ok=True)
            last = log["log"][-1]
            return {"steps": sp.steps, "final_task_loss": last["task_loss"], "final_hoyer": last["hoyer"],
                    "final_zero_fraction": last["zero_fraction"], "log": log["log"]}

        timed(stage, run_sparsify)
        fp = stage.fingerprint
        dense = load_dense(stage.dir)
    cfg = moe_config(dense, opts)
    L, E = dense.num_layers, cfg.num_experts[0]
    fp_dense = fp

    def ffn_inputs(seqs: torch.Tensor, acts_dir: Path, desc: str) -> list[Path]:
        """Every FFN's input on ``seqs`` from the model as trained, captured once into ``acts_dir`` (kept
        across an interrupted stage by its ``complete`` marker)."""
        if not (acts_dir / "complete").is_file():
            acts_dir.mkdir(exist_ok=True)
            capture_ffn_inputs(build_model(dense, device=device), seqs, acts_dir, desc=desc)
            (acts_dir / "complete").write_text("")
        return ffn_input_paths(acts_dir, L)

    # 2. split: balanced k-means on the first layer's rows or on activation profiles (or contiguous) neuron orders
    def run_split(part: Path) -> dict:
        coactivation = opts.split == "coactivation"
        inputs = ffn_inputs(text.split, part / "acts", "split: capture FFN inputs") if coactivation else None
        orders = {}
        for i in tqdm(range(L), desc=f"split: {opts.split}"):
            ffn = {k: None if v is None else v.float() for k, v in dense_ffn(dense, i).items()}
            if opts.split == "kmeans":
                order = balanced_kmeans_order(ffn["w_in"], E, seed=opts.seed + i)
            elif coactivation:   # h on the device (Gemma-2B: ~1 TFLOP a layer), k-means on the CPU
                x = torch.from_numpy(np.load(inputs[i])).to(device)
                h = dense_hidden(x, {k: None if v is None else v.to(device) for k, v in ffn.items()}, cfg.activation)
                order = coactivation_order(h.cpu(), E, seed=opts.seed + i)
            else:
                order = contiguous_order(dense.d_ff)
            orders[f"layer_{i}"] = order
        save_file(orders, str(part / "orders.safetensors"))
        if coactivation:
            shutil.rmtree(part / "acts")  # bulky and no longer needed
        return {"split": opts.split, "num_experts": E, "expert_size": cfg.expert_size[0],
                **({"tokens": int(text.split.numel())} if coactivation else {})}

    split_key = [opts.split_tokens, text.corpus] if opts.split == "coactivation" else []  # kmeans dirs keep their stage
    stage = Stage(work, "split", fingerprint(fp, opts.split, E, opts.seed, *split_key))
    timed(stage, run_split)
    fp = stage.fingerprint
    orders = load_file(str(stage.dir / "orders.safetensors"))
    experts = layer_experts(dense, cfg, orders)

    # 3. routers: regression (D2DMoE) or classifier (MoEfication), trained on the frozen model
    def run_routers(part: Path) -> dict:
        if not opts.routers.steps:
            gen = torch.Generator().manual_seed(opts.seed)
            for i in range(L):
                save_file(init_router(dense.hidden_size, cfg.router_width, E, gen), str(part / f"router_{i:02d}.safetensors"))
            return {"trained": False}
        acts_dir = part / "acts"
        acts = ffn_inputs(text.routers, acts_dir, "routers: capture FFN inputs")
        metrics = train_routers(acts, [{k: v.float() for k, v in ex.items()} for ex in experts], cfg.activation,
                                opts.method, opts.routers, opts.seed, part, device)
        shutil.rmtree(acts_dir)  # bulky and no longer needed
        return {"trained": True, "method": opts.method, "tokens": int(text.routers.numel()), "layers": metrics}

    suffix = "" if opts.method == "d2dmoe" else f"-{opts.method}"  # both methods can share one work dir
    stage = Stage(work, "routers" + suffix, fingerprint(fp, asdict(opts.routers), opts.method, opts.seed, text.corpus))
    router_info = timed(stage, run_routers)
    fp = stage.fingerprint
    routers = load_routers(stage.dir, L)

    # 3b. attention (optional): projections -> distilled ReLU MLPs -> experts + routers
    projections, attention_info = {}, None
    if cfg.projections:
        def run_attention(part: Path) -> dict:
            model = build_model(dense, device=device)
            return convert_attention(model, dense, cfg.projections, text.attention, opts.attention, opts.routers,
                                     opts.seed, part, device)

        stage = Stage(work, "attention", fingerprint(fp_dense, asdict(opts.attention), asdict(opts.routers), opts.seed,
                                                    text.corpus))
        attention_info = timed(stage, run_attention)
        fp = fingerprint(fp, stage.fingerprint)
        projections = load_projection_state(stage.dir, dense, cfg.projections)
    replaced = tuple(p.name for p in cfg.projections)

    # 4. calibrate: tau (or k) for the budget, measured on held-out text
    tau, top_k, layer_tau, calib = opts.tau, 0, (), None
    if measure:
        def run_calibrate(part: Path) -> dict:
            model = build_model(dense, device=device)
            attach_experts(model, {**expert_state(dense, experts, routers), **projections}, dense.model_type,
                           cfg.activation, reference=opts.calibrate.reference)
            result = calibrate(model, text.calib, text.heldout, opts.method, budget, opts.tau, opts.calibrate)
            if relu or opts.sparsify.steps:  # the original (not ReLU-fied or fine-tuned) model too: the reference
                del model
                original = build_model(source, device=device)
                result["ppl_original"] = perplexity(original, text.heldout, desc="calibrate: perplexity, original")
            write_json(part / "result.json", result)
            return result

        # Per-layer taus in their own stage: one work dir keeps both calibrations (neither redoes the other),
        # and the per-layer options do not enter one tau's fingerprint.
        name = "calibrate" + suffix + ("-per-layer" if opts.calibrate.per_layer else "")
        stage = Stage(work, name, fingerprint(fp, opts.calibrate.stage_key(), opts.tau, text.corpus))
        calib = timed(stage, run_calibrate)
        tau, top_k, layer_tau = calib["tau"], calib["top_k"], tuple(calib.get("layer_tau") or ())

        # 4b. adapt (optional): the model fine-tuned under that selection, re-split into the same experts
        if opts.adapt.steps:
            def run_adapt(part: Path) -> dict:
                trained = part / "trained.json"   # the training finished (a cut during the measuring keeps it)
                if not trained.is_file():
                    model = build_model(dense, device=device)
                    select_experts_in_ffns_(model, routers, [orders[f"layer_{i}"] for i in range(L)], E, tau, top_k,
                                            layer_tau, opts.calibrate.reference)
                    teacher = (build_model(source, device=device).requires_grad_(False).eval()
                               if opts.adapt.distill else None)
                    log = finetune(model, text.adapt, opts.adapt.training(), part / "train_state.pt", teacher,
                                   desc="adapt (fine-tuning under the selection)")
                    del teacher
                    save_dense(dense.config, state_dict_for_export(model), dense, part)
                    # "keep": adapt's activation wraps the model's own module, so zeros count as |a| < 0.01
                    plot_log(log["log"], part / "adapt.png", "keep")
                    write_json(trained, log)
                    (part / "train_state.pt").unlink(missing_ok=True)
                    del model
                log = json.loads(trained.read_text())
                adapted = load_dense(part)
                moe = build_model(adapted, device=device)
                attach_experts(moe, expert_state(adapted, layer_experts(adapted, cfg, orders), routers),
                               dense.model_type, cfg.activation, reference=opts.calibrate.reference)
                # the adapted model runs its experts a little differently: the selection's taus scaled by one
                # factor to spend the budget again (k of MoEfication is fixed)
                found = None
                if budget is not None and not top_k:
                    found = scale_to_budget(moe, text.calib, budget, tau, layer_tau, opts.calibrate.iterations,
                                            "adapt: taus back to the budget")
                new_tau, new_layer_tau = (found[0], found[1]) if found else (tau, list(layer_tau))
                after = measure_quality(moe, text.heldout, new_tau, top_k, new_layer_tau, stage="adapt")
                before = {k: calib[k] for k in ADAPT_MEASURES + ("tau", "layer_tau") if k in calib}
                return {"steps": opts.adapt.steps, "final_task_loss": log["log"][-1]["task_loss"], "before": before,
                        "tau": new_tau, "layer_tau": new_layer_tau or None, **after, "log": log["log"]}

            stage = Stage(work, "adapt" + name.removeprefix("calibrate"),
                          fingerprint(stage.fingerprint, opts.adapt.stage_key(), opts.seed, text.corpus))
            adapt_info = timed(stage, run_adapt)
            dense = load_dense(stage.dir)
            experts = layer_experts(dense, cfg, orders)
            tau, layer_tau = adapt_info["tau"], tuple(adapt_info["layer_tau"] or ())
            calib = {**calib, "ppl_original": calib.get("ppl_original", calib["ppl_dense"]),   # before adapt's
                     **{k: adapt_info[k] for k in ADAPT_MEASURES},
                     "adapt": {"steps": adapt_info["steps"], "final_task_loss": adapt_info["final_task_loss"],
                               "before": adapt_info["before"]}}

    # 5. export: the checkpoint, validated by the plugin's validator, renamed into place
    t0 = time.time()
    cfg = moe_config(dense, opts, tau=tau, top_k=top_k, layer_tau=layer_tau)
    state = export_state(dense, experts, routers, opts.dtype, projections, replaced)
    dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    staging = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(export_config(dense, cfg, dtype), indent=2))
        dense.save_tokenizer(staging)
        validate_checkpoint(staging)
        report = build_report(dense, cfg, opts, state, router_info, calib, seconds, work, dst, attention_info)
        seconds["export"] = round(time.time() - t0, 1)
        report["seconds"]["total"] = round(time.time() - t_start, 1)
        write_json(staging / "d2dmoe_report.json", report)
        if dst.exists():
            shutil.rmtree(dst)
        staging.rename(dst)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(work / "report.json", report)
    return report


def build_report(dense, cfg, opts, state, router_info, calib, seconds, work, dst, attention_info=None) -> dict:
    router_params = sum(v.numel() for k, v in state.items() if ".router." in k)
    report = {
        "output": str(dst), "work_dir": str(work), "model_type": dense.model_type, "layers": dense.num_layers,
        "experts_per_layer": cfg.num_experts[0], "expert_size": cfg.expert_size[0], "split": opts.split,
        "activation": cfg.activation, "method": opts.method, "tau": cfg.tau, "top_k": cfg.top_k,
        "layer_tau": list(cfg.layer_tau) or None, "tau_summary": cfg.describe_tau(),
        "budget": opts.calibrate.budget,
        "parameters": {"total": sum(v.numel() for v in state.values()), "routers": router_params},
        "routers_trained": bool(router_info.get("trained")),
        "seconds": seconds,
    }
    if router_info.get("trained"):
        layers = router_info["layers"]
        report["router_val_loss"] = {"before": sum(m["val_loss_before"] for m in layers) / len(layers),
                                     "after": sum(m["val_loss_after"] for m in layers) / len(layers)}
    if attention_info is not None:
        layers = attention_info["layers"]
        report["attention_experts"] = {
            "projections": attention_info["projections"],
            "mse_svd_init": sum(m["mse_svd_init"] for m in layers) / len(layers),
            "mse_distilled": sum(m["mse_distilled"] for m in layers) / len(layers),
            "target_var": sum(m["target_var"] for m in layers) / len(layers)}
    if calib is not None:
        report.update({k: calib[k] for k in ("ffn_fraction", "ppl_dense", "ppl_converted", "heldout_tokens")})
        if "projection_fraction" in calib:
            report["projection_fraction"] = calib["projection_fraction"]
        report["ppl_original"] = calib.get("ppl_original", calib["ppl_dense"])
        if "adapt" in calib:
            report["adapt"] = calib["adapt"]
        if "per_layer" in calib:
            report["per_layer"] = {k: calib["per_layer"].get(k) for k in ("best", "one_tau_calib_nll", "skipped")}
            report["per_layer_blends"] = list(opts.calibrate.blends)
    return report


def format_report(report: dict) -> str:
    lines = [f"  {'model':22s} {report['model_type']}, {report['layers']} layers, "
             f"{report['experts_per_layer']} experts x {report['expert_size']} neurons per FFN ({report['split']})",
             f"  {'parameters':22s} {report['parameters']['total']:,} (routers {report['parameters']['routers']:,})",
             f"  {'method':22s} {report['method']}, activation {report['activation']}, "
             + (f"top-k {report['top_k']}" if report["top_k"] else report.get("tau_summary", f"tau {report['tau']:.4f}"))
             + (f" (budget {report['budget']:.0%} of FFN compute)" if report["budget"] is not None else "")]
    if "attention_experts" in report:
        a = report["attention_experts"]
        desc = ", ".join(f"{n} {p['d_in']}->{p['hidden']}->{p['d_out']} ({p['experts']}x{p['expert_size']})"
                         for n, p in a["projections"].items())
        lines.append(f"  {'attention experts':22s} {desc}")
        lines.append(f"  {'distillation MSE':22s} rank-h/2 SVD start {a['mse_svd_init']:.4g} -> distilled "
                     f"{a['mse_distilled']:.4g} (output variance {a['target_var']:.4g}; mean over projections)")
    if "ffn_fraction" in report:
        lines.append(f"  {'executed FFN compute':22s} {report['ffn_fraction']:.1%} (held-out, {report['heldout_tokens']} tokens)")
        if "projection_fraction" in report:
            lines.append(f"  {'executed attn experts':22s} {report['projection_fraction']:.1%} of their compute")
        rel = report["ppl_converted"] / report["ppl_original"] - 1
        kind = "adapted" if "adapt" in report else "sparsified" if "sparsify" in report["seconds"] else "ReLU-fied"
        relu = (f", {kind} dense {report['ppl_dense']:.2f}" if report["ppl_original"] != report["ppl_dense"] else "")
        lines.append(f"  {'held-out perplexity':22s} dense {report['ppl_original']:.2f}{relu} -> converted "
                     f"{report['ppl_converted']:.2f} ({rel:+.1%} vs dense)")
        if "adapt" in report:
            b = report["adapt"]["before"]
            lines.append(f"  {'adapt':22s} {report['adapt']['steps']} steps under the selection: converted "
                         f"{b['ppl_converted']:.2f} at {b['ffn_fraction']:.1%} before, all experts "
                         f"{b['ppl_dense']:.2f} -> {report['ppl_dense']:.2f}")
        if "per_layer" in report:
            p = report["per_layer"]
            if p.get("skipped"):
                verdict = f"skipped: {p['skipped']}"
            elif p.get("best") is None:
                verdict = "not kept: no candidate within the budget"
            else:
                verdict = (f"{'kept' if report['layer_tau'] else 'not kept'}: calibration NLL "
                           f"{p['best']['calib_nll']:.4f} vs one tau's {p['one_tau_calib_nll']:.4f}"
                           f" (best of {', '.join(f'{b:.0%}' for b in report['per_layer_blends'])} toward the allocation)")
            lines.append(f"  {'per-layer taus':22s} {verdict}" + (" (before adapt)" if "adapt" in report else ""))
    elif not report["routers_trained"]:
        lines.append(f"  {'routers':22s} untrained (--router-steps 0): not measured")
    if "router_val_loss" in report:
        r = report["router_val_loss"]
        lines.append(f"  {'router held-out loss':22s} {r['before']:.4g} -> {r['after']:.4g} (mean over layers)")
    lines.append(f"  {'seconds per stage':22s} " + ", ".join(f"{k} {v}" for k, v in report["seconds"].items()))
    lines.append(f"  {'output':22s} {report['output']} (work dir {report['work_dir']})")
    return "\n".join(lines)
