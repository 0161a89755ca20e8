"""The GPU recipe script: its start from another run's sparsified model (``--sparsified-from``: that run's GGUF
as the source, only finished stages copied, refused where they are not finished or the --work holds another
expert size), its options, the merge of a sweep finished over two runs; and the whole script end to end on a
tiny Gemma 3 (``--smoke --dense``), the two-run flow of a lease that ran out included. (With the real
Gemma 3 270M, ``--smoke`` takes minutes: too slow for the suite.)"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_convert_recipe as recipe  # noqa: E402  (benchmarks/, on the path through conftest)

ROOT = Path(__file__).resolve().parents[1]


def default_run_recipe() -> dict:
    """The "recipe" a run with the default arguments writes to its recipe.json: the recipe, its adapt stage."""
    return {**recipe.RECIPE, "adapt": recipe.adapt_recipe(recipe.RECIPE["sparsify"], recipe.ADAPT_STEPS),
            "corpus": "sotu"}


def finished_run(root: Path) -> Path:
    (root / recipe.GGUF).parent.mkdir(parents=True)
    (root / recipe.GGUF).write_bytes(b"GGUF")
    for name in ("dense", "sparsify"):
        (root / "stages" / name).mkdir(parents=True)
        (root / "stages" / name / "stage.json").write_text(json.dumps({"stage": name, "fingerprint": name}))
    (root / "stages" / "sparsify" / "model.safetensors").write_bytes(b"weights")
    (root / "stages" / "split").mkdir()  # depends on the expert size: not taken
    return root


def test_copies_finished_stages_and_converts_from_their_gguf(tmp_path):
    src, work = finished_run(tmp_path / "e64"), tmp_path / "e32"
    gguf = recipe.copy_sparsified(src, work)
    assert gguf == src / recipe.GGUF and not (work / recipe.GGUF).exists()
    assert (work / "stages" / "sparsify" / "model.safetensors").read_bytes() == b"weights"
    assert (work / "stages" / "dense" / "stage.json").is_file() and not (work / "stages" / "split").exists()
    (work / "stages" / "sparsify" / "model.safetensors").write_bytes(b"resumed")  # a second call keeps what is there
    recipe.copy_sparsified(src, work)
    assert (work / "stages" / "sparsify" / "model.safetensors").read_bytes() == b"resumed"


def test_refuses_a_run_without_a_finished_sparsify_stage(tmp_path):
    src = finished_run(tmp_path / "e64")
    (src / "stages" / "sparsify" / "stage.json").unlink()  # interrupted: only a partial stage
    with pytest.raises(SystemExit, match="no finished stages/sparsify.*Fix: finish that run first"):
        recipe.copy_sparsified(src, tmp_path / "e32")
    assert not (tmp_path / "e32" / "stages" / "sparsify").exists()


@pytest.mark.parametrize("args, message", [
    (["--methods", "d2dmoe,topk"], "expected some of d2dmoe, moefication, d2dmoe-per-layer"),
    (["--expert-size", "32"], "holds a run with expert_size 64, not 32"),
    (["--sparsify-steps", "1920"], "holds a run with sparsify_steps 480, not 1920"),
    (["--sparsify-steps", "0"], "--sparsify-steps 0: give at least 1"),
    (["--generated", "0.5"], "holds a run with generated 0.0, not 0.5"),
    (["--generated", "2"], "--generated 2.0: a share of the sparsify sequences, in [0, 1]"),
    (["--split", "kmeans"], "holds a run with split coactivation, not kmeans"),
    (["--teacher-engine", "vllm"], "--teacher-engine vllm: it samples --generated's text, and no share is generated"),
    (["--teacher-engines", "2"], "--teacher-engines 2: it samples --generated's text, and no share is generated"),
    (["--sparsify-activation", "keep"], "holds a run with sparsify_activation relu, not keep"),
    (["--hoyer-alpha", "0.003"], "holds a run with hoyer_alpha 0.001, not 0.003"),
    (["--adapt-steps", "240"], f"holds a run with adapt_steps {recipe.ADAPT_STEPS}, not 240"),
    (["--adapt-steps", "0"], f"holds a run with adapt_steps {recipe.ADAPT_STEPS}, not 0"),
    (["--adapt-steps", "-1"], "--adapt-steps -1: give 0 (no adapt stage) or more"),
    (["--adapt-lr", "2.5e-5"], "holds a run with adapt_lr 5e-05, not 2.5e-05"),
    (["--adapt-lr", "0"], "--adapt-lr 0: a learning rate, > 0"),
    (["--adapt-steps", "0", "--adapt-lr", "1e-5"], "--adapt-lr 1e-05: there is no adapt stage (--adapt-steps 0)"),
    (["--dense", "no-such-model"], "--dense no-such-model: does not exist"),
    (["--dense", str(ROOT), "--sparsified-from", "other"], "--dense and --sparsified-from"),
    (["--dense", str(ROOT)], f"holds a run with dense None, not {ROOT}"),
])
def test_bad_arguments_are_refused_before_any_work(tmp_path, args, message):
    work = tmp_path / "work"
    work.mkdir()
    (work / "recipe.json").write_text(json.dumps({"provenance": {}, "recipe": default_run_recipe()}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_convert_recipe.py"), "--work", str(work),
                           "--out", str(tmp_path / "out"), *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert sorted(p.name for p in work.iterdir()) == ["recipe.json"]


def test_profile_sparsify_smoke(tmp_path):
    """``profile_sparsify.py --smoke`` (the GPU profile's code path on a tiny Gemma 3): every variant times
    its steps from ``finetune``'s own per-step log, the profile names the ops that took the time, and a
    run without a GPU is refused unless it is the smoke check."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_sparsify.py"), "--out", str(tmp_path), "--steps", "4",
           "--warmup", "1"]
    proc = subprocess.run(cmd + ["--smoke"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads((tmp_path / "profile-sparsify-cpu-smoke.json").read_text())
    assert set(doc["variants"]) == {"base", "torch-kl", "per-layer-sync", "sdpa", "frozen-embedding", "compile"}
    v = doc["variants"]
    for r in v.values():
        assert len(r["step_seconds"]) == 4 and all(s > 0 for s in r["step_seconds"])
        assert r["median_step_s"] == pytest.approx(sorted(r["step_seconds"][1:])[1])
    # the variants are what they say: other attention, fewer trained parameters (the tied embedding out)
    assert v["sdpa"]["attention"] == "sdpa" and v["base"]["attention"] == "eager"
    # compiled, the same training: task loss and Hoyer term step by step as eager (same weights, same text)
    assert v["compile"]["compiled"] and not v["base"]["compiled"]
    flat = {k: [x for step in v[k]["losses"] for x in step] for k in ("base", "compile")}
    assert len(flat["base"]) == 8 and flat["compile"] == pytest.approx(flat["base"], rel=1e-3)
    assert v["torch-kl"]["kl_calls"]["triton"] == 0 and v["torch-kl"]["kl_calls"]["torch"] > 0
    assert v["base"]["kl_calls"]["torch" if torch.cuda.is_available() else "triton"] == 0   # the kernel on a GPU
    vocab, d = 512, 64  # profile_sparsify.TINY
    assert v["base"]["trained_parameters"] - v["frozen-embedding"]["trained_parameters"] == vocab * d
    names = [row["name"] for row in doc["profile_base"]["top"]]
    assert "aten::mm" in names and doc["profile_base"]["self_cpu_us_total"] > 0
    if not torch.cuda.is_available():
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0 and "GPU machine" in refused.stderr


def test_longer_sparsify_reuses_the_text_in_proportion():
    base = recipe.RECIPE["sparsify"]
    assert recipe.sparsify_recipe(base, base["steps"]) == base
    four = recipe.sparsify_recipe(base, 4 * base["steps"])
    assert four["steps"] == 4 * base["steps"] and four["passes"] == 4 * base["passes"]
    assert four["save_every"] == 4 * base["steps"] // 12 > base["save_every"]   # ~12 saves a run, not every 40 steps
    assert {k: v for k, v in four.items() if k not in ("steps", "passes", "save_every")} == \
        {k: v for k, v in base.items() if k not in ("steps", "passes", "save_every")}
    short = recipe.sparsify_recipe(base, 10)
    assert short["passes"] == base["passes"] and short["save_every"] == base["save_every"]   # never fewer


def test_reference_reaches_d2dmoe_calibration_only(monkeypatch, tmp_path):
    """--reference sum: D2DMoE's conversions calibrate against the sum, MoEfication keeps top-k (the converter
    refuses a reference with it), and the default leaves recipe.json's calibrate settings as before."""
    import copy

    from d2dmoe_converter.convert import check_options

    original = copy.deepcopy(recipe.RECIPE)
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None)
    assert recipe.RECIPE["calibrate"] == original["calibrate"]
    recipe.configure(False, 64, None, reference="sum")
    for method, want in (("d2dmoe", "sum"), ("d2dmoe-per-layer", "sum"), ("moefication", "max")):
        opts = recipe.options(method, tmp_path)
        assert opts.calibrate.reference == want
        check_options(opts)


def test_smoke_keeps_its_own_sparsify_stage(monkeypatch):
    """--smoke alone runs the smoke settings' few steps (the recipe's 480 only where nothing else is asked);
    --sparsify-steps scales whichever stage the run has."""
    import copy

    original = copy.deepcopy(recipe.RECIPE)
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(True, 64, None)
    assert recipe.RECIPE["sparsify"] == recipe.SMOKE["sparsify"]
    recipe.configure(True, 64, 4)
    assert recipe.RECIPE["sparsify"]["steps"] == 4 and recipe.RECIPE["sparsify"]["passes"] == 2
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 32, None)
    assert recipe.RECIPE["sparsify"] == original["sparsify"] and recipe.RECIPE["expert_size"] == 32
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, 960, 0.5)   # teacher text: the options d2dmoe-convert's sparsify stage takes
    assert recipe.RECIPE["sparsify"] == {**recipe.sparsify_recipe(original["sparsify"], 960), "generated": 0.5}
    from d2dmoe_converter.sparsify import SparsifyOptions
    assert SparsifyOptions(**recipe.RECIPE["sparsify"]).generated == 0.5
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None, split="coactivation")   # the converter's split option, in every method's run
    assert recipe.options("d2dmoe", Path("/w")).split == recipe.options("moefication", Path("/w")).split == "coactivation"
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None)   # the default: co-activation (measured better on this recipe, session 42)
    assert recipe.options("d2dmoe", Path("/w")).split == "coactivation"


def test_a_run_from_before_split_is_held_as_kmeans(tmp_path):
    """A recipe.json written before --split (no "split" key) was a k-means run: the co-activation default
    does not take its reports as its own."""
    work = tmp_path / "work"
    work.mkdir()
    legacy = {k: v for k, v in default_run_recipe().items() if k != "split"}
    (work / "recipe.json").write_text(json.dumps({"provenance": {}, "recipe": legacy}))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_convert_recipe.py"), "--work", str(work),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "holds a run with split kmeans, not coactivation" in proc.stderr, proc.stderr
    assert "--split" in proc.stderr


def test_no_sweep_stops_after_the_conversions(tmp_path, monkeypatch):
    """--no-sweep: the finished conversions' reports (and the sparsify / routers stage records) are written to
    --out, and the sweep never starts."""
    import copy

    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(recipe.RECIPE))
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "stages" / "sparsify").mkdir(parents=True)
    (work / "stages" / "routers").mkdir(parents=True)
    (work / recipe.GGUF).write_bytes(b"GGUF")
    (work / "stages" / "sparsify" / "stage.json").write_text(json.dumps({"stage": "sparsify", "steps": 480}))
    (work / "stages" / "routers" / "stage.json").write_text(json.dumps({"stage": "routers"}))
    (work / "stages" / "sparsify" / "sparsify.png").write_bytes(b"png")
    report = {"ffn_fraction": 0.5, "ppl_converted": 25.0}
    (work / "recipe.json").write_text(json.dumps({"provenance": {}, "recipe": default_run_recipe(),
                                                  "report_d2dmoe": report}))

    def no_sweep(*args, **kwargs):
        raise AssertionError("the sweep ran under --no-sweep")

    monkeypatch.setattr(recipe, "sweep", no_sweep)
    monkeypatch.setattr(sys, "argv", ["gpu_convert_recipe.py", "--work", str(work), "--out", str(out),
                                      "--methods", "d2dmoe", "--no-sweep"])
    recipe.main()
    written = json.loads((out / "convert-recipe-gemma3-270m.json").read_text())
    assert written["report_d2dmoe"] == report and written["sparsify"]["steps"] == 480 and "sweep" not in written
    assert (out / "convert-recipe-gemma3-270m-sparsify.png").read_bytes() == b"png"


def test_recipe_levers_tabulates_each_conversion_against_its_sparsified_model(tmp_path):
    """``recipe_levers.py``: a row per finished conversion of each run, its ratios computed from that run's own
    sparsified and original perplexities; a run with no finished conversion is refused by name."""
    def run(split, ppl, sparsified, per_layer=None):
        doc = {"provenance": {"device": "NVIDIA H100", "date": "2026-12-05"},
               "recipe": {**recipe.RECIPE, "split": split}, "sparsify": {"final_hoyer": 130.0},
               "report_d2dmoe": {"tau_summary": "tau = 0.07", "ffn_fraction": 0.5, "ppl_converted": ppl,
                                 "ppl_dense": sparsified, "ppl_original": 20.0, "heldout_tokens": 32768}}
        if per_layer:
            doc["report_d2dmoe-per-layer"] = {**doc["report_d2dmoe"], "ppl_converted": per_layer}
        return doc

    paths = {}
    for name, doc in {"km": run("kmeans", 30.0, 24.0), "co": run("coactivation", 27.0, 24.0, 26.0)}.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(doc))
    out = tmp_path / "levers.json"
    script = [sys.executable, str(ROOT / "benchmarks" / "recipe_levers.py"), "--out", str(out)]
    proc = subprocess.run(script + [f"k-means={paths['km']}", f"co-act={paths['co']}"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["run"], r["method"], r["split"]) for r in rows] == [
        ("k-means", "d2dmoe", "kmeans"), ("co-act", "d2dmoe", "coactivation"), ("co-act", "d2dmoe-per-layer", "coactivation")]
    assert [round(r["vs_original"], 6) for r in rows] == [0.5, 0.35, 0.3]
    assert [r["hoyer_alpha"] for r in rows] == [recipe.RECIPE["sparsify"]["alpha"]] * 3
    adapted = run("coactivation", 22.0, 23.0)   # after adapt the report's dense model is the adapted one
    adapted["report_d2dmoe"]["adapt"] = {"steps": 240, "before": {"ppl_dense": 24.0, "ppl_converted": 27.0}}
    adapted["recipe"]["adapt"] = {"steps": 240, "lr": 2.5e-5}
    paths["ad"] = tmp_path / "ad.json"
    paths["ad"].write_text(json.dumps(adapted))
    assert subprocess.run(script + [f"adapt={paths['ad']}"], capture_output=True, text=True, timeout=300).returncode == 0
    row = json.loads(out.read_text())["rows"][0]
    assert (row["ppl_sparsified"], row["adapt_steps"], row["adapt_lr"], round(row["vs_sparsified"], 6)) == (
        24.0, 240, 2.5e-5, round(22 / 24 - 1, 6))
    assert [r["adapt_lr"] for r in rows] == [None] * 3   # no adapt stage: no rate
    assert [round(r["vs_sparsified"], 6) for r in rows] == [0.25, 0.125, round(26 / 24 - 1, 6)]
    assert out.with_suffix(".png").stat().st_size > 10_000

    unfinished = tmp_path / "unfinished.json"
    unfinished.write_text(json.dumps({k: v for k, v in run("kmeans", 1, 1).items() if k != "report_d2dmoe"}))
    proc = subprocess.run(script + [f"cut={unfinished}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "cut: no finished conversion" in proc.stderr and "Fix:" in proc.stderr


def test_teacher_engine_reaches_the_converter(monkeypatch):
    """--teacher-engine: the converter's --sparsify-generated-engine for --generated's text; left out of the
    recipe where it is auto (recipe.json of the runs before it keeps its form); refused where nothing is
    generated."""
    import copy

    original = copy.deepcopy(recipe.RECIPE)
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None, 0.5, teacher_engine="transformers")
    assert recipe.options("d2dmoe", Path("/w")).sparsify.generated_engine == "transformers"
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None, 0.5, teacher_engine="auto")
    assert "generated_engine" not in recipe.RECIPE["sparsify"]
    assert recipe.options("d2dmoe", Path("/w")).sparsify.generated_engine == "auto"
    with pytest.raises(SystemExit, match="no share is generated. Fix: pass --generated SHARE"):
        recipe.configure(False, 64, None, 0.0, teacher_engine="transformers")


def test_adapt_steps_reach_the_converter(monkeypatch):
    """--adapt-steps: an adapt stage with sparsify's batch and sequence length, half its learning rate,
    distilled, the passes over the text in proportion; ADAPT_STEPS without it (the smoke run's few steps with
    --smoke); left out of the recipe (and off) with 0."""
    import copy

    original = copy.deepcopy(recipe.RECIPE)
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None, adapt_steps=240)
    a = recipe.options("d2dmoe-per-layer", Path("/w")).adapt
    sp = original["sparsify"]
    assert (a.steps, a.batch, a.seq_len, a.lr, a.distill) == (240, sp["batch"], sp["seq_len"], sp["lr"] / 2, 1.0)
    assert a.passes == 2          # 240 x 16 x 512 tokens; one pass of the recipe's text is 480 x 16 x 512 / 3
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None)
    assert recipe.options("d2dmoe", Path("/w")).adapt.steps == recipe.ADAPT_STEPS == 1000
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(True, 64, None)
    assert recipe.RECIPE["adapt"] == recipe.adapt_recipe(recipe.SMOKE["sparsify"], recipe.SMOKE_ADAPT_STEPS)
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None, adapt_steps=0)
    assert "adapt" not in recipe.RECIPE and recipe.options("d2dmoe", Path("/w")).adapt.steps == 0


def test_adapt_lr_reaches_the_converter(monkeypatch):
    """--adapt-lr: the adapt stage's peak learning rate, nothing else of it changed; refused without an adapt
    stage (naming the fix) and when not positive."""
    import copy

    original = copy.deepcopy(recipe.RECIPE)
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None)
    default = recipe.options("d2dmoe-per-layer", Path("/w")).adapt
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None, adapt_lr=2.5e-5)
    a = recipe.options("d2dmoe-per-layer", Path("/w")).adapt
    assert a.lr == 2.5e-5 != default.lr
    assert dataclasses.replace(a, lr=default.lr) == default
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    with pytest.raises(SystemExit, match="no adapt stage.*Fix: drop --adapt-lr"):
        recipe.configure(False, 64, None, adapt_steps=0, adapt_lr=2.5e-5)
    with pytest.raises(SystemExit, match="a learning rate, > 0"):
        recipe.configure(False, 64, None, adapt_lr=0.0)


@pytest.mark.parametrize("adapt_steps", [0, 1000])
def test_merge_puts_the_sweep_into_the_quality_json(tmp_path, monkeypatch, adapt_steps):
    """--merge: the fetched sweep, with the original model's measures, the run's provenance and recipe, becomes
    the quality JSON's ``gpu_recipe`` (its other parts kept) and gets its plots; the note and the plots' title
    say whether the conversions were adapted (their weights then are not the swept dense model's)."""
    from d2dmoe_converter import evaluate

    titles, plot_all = [], evaluate.plot_all
    monkeypatch.setattr(evaluate, "plot_all", lambda r, path, title: titles.append(title) or plot_all(r, path, title))
    committed = json.loads((ROOT / "benchmarks" / "results" / "quality-gemma3-270m.json").read_text())
    old = committed["gpu_recipe"]
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    sweep_result = {k: v for k, v in old.items() if k not in ("original", "provenance", "recipe", "note")}
    (fetched / "convert-recipe-gemma3-270m-sweep.json").write_text(json.dumps(sweep_result))
    (fetched / "convert-recipe-gemma3-270m-original.json").write_text(json.dumps({"dense": old["original"]}))
    run_recipe = {k: v for k, v in old["recipe"].items() if k != "adapt"}
    if adapt_steps:
        run_recipe["adapt"] = {"steps": adapt_steps}
    (fetched / "convert-recipe-gemma3-270m.json").write_text(json.dumps({"provenance": {"git_sha": "abc"},
                                                                         "recipe": run_recipe}))
    quality = tmp_path / "quality-gemma3-270m.json"
    quality.write_text(json.dumps({**committed, "gpu_recipe": {}}))
    recipe.merge([fetched], quality)
    doc = json.loads(quality.read_text())
    assert {k: v for k, v in doc.items() if k != "gpu_recipe"} == \
        {k: v for k, v in committed.items() if k != "gpu_recipe"}   # the CPU conversion, the other GPU runs
    merged = doc["gpu_recipe"]
    assert merged["points"] == old["points"] and merged["original"] == old["original"]
    assert merged["provenance"] == {"git_sha": "abc"} and merged["recipe"] == run_recipe
    assert ("fine-tuned 1000 steps under its own selection" in merged["note"]) == bool(adapt_steps)
    assert titles == [f"Gemma 3 270M, GPU recipe{' (adapt 1000 steps)' if adapt_steps else ''}: quality vs compute"]
    assert {p.name for p in tmp_path.glob("*.png")} == {
        f"quality-gemma3-270m-gpu-recipe-{k}.png" for k in ("quality", "quality-ffn", "usage")}


def split_sweep(sweep: dict, first_checkpoints: int) -> tuple[dict, dict]:
    """A whole sweep as two device runs would have left it: the first run (every method) cut after the
    points of its first ``first_checkpoints`` checkpoints, the second run with --methods naming the rest."""
    head = sweep["checkpoints"][:first_checkpoints]
    a = {**sweep, "points": [p for p in sweep["points"] if p["checkpoint"] in head], "complete": False}
    b = {**sweep, "checkpoints": sweep["checkpoints"][first_checkpoints:], "complete": True,
         "points": [p for p in sweep["points"] if p["checkpoint"] not in head]}
    return a, b


def write_fetched(folder: Path, sweep: dict, original: dict, run: dict | None = None) -> Path:
    folder.mkdir()
    (folder / recipe.SWEEP).write_text(json.dumps(sweep))
    (folder / recipe.ORIGINAL).write_text(json.dumps({"dense": original}))
    (folder / recipe.RUN).write_text(json.dumps(run or {"provenance": {"git_sha": folder.name}, "recipe": {
        "sparsify": {"activation": "relu"}, "adapt": {"steps": 1000}}}))
    return folder


def committed_sweep() -> tuple[dict, dict]:
    old = json.loads((ROOT / "benchmarks" / "results" / "quality-gemma3-270m.json").read_text())["gpu_recipe"]
    assert len(old["checkpoints"]) == 2 and old["complete"]
    return {k: v for k, v in old.items() if k not in ("original", "provenance", "recipe", "note")}, old["original"]


def test_merge_joins_a_sweep_finished_over_two_runs(tmp_path):
    """A sweep cut before its second method (session 51) and that method's points from a second run of the same
    recipe merge into the whole sweep: every point once, in order, the first run's provenance and original
    model, the parts named; the same points as the sweep run in one go."""
    whole, original = committed_sweep()
    a, b = split_sweep(whole, 1)
    quality = tmp_path / "quality-gemma3-270m.json"
    quality.write_text(json.dumps({"gpu_recipe": {}}))
    first = write_fetched(tmp_path / "first", a, original)
    second = write_fetched(tmp_path / "second", b, {"ppl": {"sotu": 1.0}})   # the second's original is not used
    recipe.merge([first, second], quality)
    merged = json.loads(quality.read_text())["gpu_recipe"]
    assert merged["points"] == whole["points"] and merged["complete"] is True
    assert merged["original"] == original and merged["provenance"] == {"git_sha": "first"}
    assert [(p["folder"], p["points"]) for p in merged["parts"]] == [(str(first), len(a["points"])),
                                                                     (str(second), len(b["points"]))]
    assert "swept over 2 device runs" in merged["note"]
    merged_twice = tmp_path / "again.json"
    merged_twice.write_text(json.dumps({"gpu_recipe": {}}))
    recipe.merge([first, second, second], merged_twice)   # a folder given twice adds no point twice
    assert json.loads(merged_twice.read_text())["gpu_recipe"]["points"] == whole["points"]


def test_merge_refuses_parts_that_do_not_make_one_sweep(tmp_path):
    """Refused, naming the fix, with the quality JSON untouched: a sweep still missing points (alone, or with
    a second run that lacks one), and a second run whose dense model measured otherwise (another sparsified
    model) or whose options differ."""
    whole, original = committed_sweep()
    a, b = split_sweep(whole, 1)
    quality = tmp_path / "quality-gemma3-270m.json"
    quality.write_text(json.dumps({"gpu_recipe": {"kept": True}}))
    first = write_fetched(tmp_path / "first", a, original)
    cases = {
        "alone": ([], "lacks points of .*moefication.*--methods naming those conversions and give both folders"),
        "short": ([{**b, "points": b["points"][:-1]}], "lacks points of .*moefication"),
        "other-dense": ([{**b, "dense": {**b["dense"], "ppl": {**b["dense"]["ppl"], "sotu": b["dense"]["ppl"]["sotu"]
                                                             * 1.001}}}],
                        "dense model is not .*first's \\(ppl sotu.*another sparsified model.*in one lease"),
        "other-options": ([{**b, "options": {**b["options"], "tokens": 1}}], "options is not .*first's"),
        "stranger": ([{**b, "checkpoints": ["/elsewhere/moefication"]}], "are not among .*first's"),
    }
    for name, (rest, message) in cases.items():
        folders = [first] + [write_fetched(tmp_path / f"{name}-{i}", r, original) for i, r in enumerate(rest)]
        with pytest.raises(SystemExit, match=message):
            recipe.merge(folders, quality)
        assert json.loads(quality.read_text()) == {"gpu_recipe": {"kept": True}}


def test_unfinished_checkpoints_reads_a_sweep_json():
    """What --merge checks, read from a sweep JSON alone: it agrees with ``complete`` on every sweep under
    benchmarks/results (D2DMoE with one tau and a tau per layer, MoEfication, oracle points), one point less
    leaves its checkpoint unfinished, and session 51's cut sweep lacks exactly its MoEfication points."""
    from d2dmoe_converter.evaluate import unfinished_checkpoints

    sweeps = []
    for f in sorted((ROOT / "benchmarks" / "results").rglob("*.json")):
        doc = json.loads(f.read_text())
        if isinstance(doc, dict):
            sweeps += [r for r in (doc, *doc.values())
                       if isinstance(r, dict) and {"points", "checkpoints", "options"} <= r.keys()]
    assert len(sweeps) >= 8 and any(r["options"].get("oracle") for r in sweeps)
    assert {p["method"] for r in sweeps for p in r["points"]} >= {"d2dmoe", "d2dmoe-per-layer", "moefication",
                                                                    "d2dmoe-oracle"}
    for r in sweeps:
        assert (unfinished_checkpoints(r) == []) == r["complete"]
        for drop in (0, len(r["points"]) - 1) if r["complete"] and r["points"] else ():
            cut = {**r, "points": r["points"][:drop] + r["points"][drop + 1:]}
            assert unfinished_checkpoints(cut) == [r["points"][drop]["checkpoint"]]
    cut51 = json.loads((ROOT / "benchmarks/results/attempts/51-lease/sweep" / recipe.SWEEP).read_text())
    assert unfinished_checkpoints(cut51) == ["/root/sweep/moefication"]
    assert unfinished_checkpoints({**cut51, "checkpoints": cut51["checkpoints"][:1]}) == []


def test_merge_of_a_run_without_a_sweep_names_the_fix(tmp_path):
    (tmp_path / "fetched").mkdir()
    (tmp_path / "fetched" / "convert-recipe-gemma3-270m.json").write_text("{}")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_convert_recipe.py"), "--merge",
                           str(tmp_path / "fetched"), "--out", str(tmp_path / "quality.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no convert-recipe-gemma3-270m-sweep.json there" in proc.stderr
    assert "Fix: rerun the device command without --no-sweep" in proc.stderr
    assert not (tmp_path / "quality.json").exists()


def test_sparsify_activation_reaches_the_converter(monkeypatch):
    """--sparsify-activation keep: the converter's option in every method's run; left out of the recipe for
    relu (recipe.json of the runs before it keeps its form). A relu run's work dir is not taken as a keep run:
    test_bad_arguments_are_refused_before_any_work."""
    import copy

    original = copy.deepcopy(recipe.RECIPE)
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None, activation="keep")
    assert recipe.options("d2dmoe", Path("/w")).sparsify.activation == "keep"
    assert recipe.options("moefication", Path("/w")).sparsify.activation == "keep"
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None)
    assert "activation" not in recipe.RECIPE["sparsify"] and recipe.options("d2dmoe", Path("/w")).sparsify.relu


def test_hoyer_alpha_reaches_the_converter(monkeypatch):
    """--hoyer-alpha: the sparsify stage's weight in every method's run; a negative weight is refused. A run of
    another weight is not resumed as this one: test_bad_arguments_are_refused_before_any_work."""
    import copy

    original = copy.deepcopy(recipe.RECIPE)
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(original))
    recipe.configure(False, 64, None, activation="keep", alpha=3e-3)
    assert recipe.options("d2dmoe", Path("/w")).sparsify.alpha == recipe.options("moefication", Path("/w")).sparsify.alpha == 3e-3
    with pytest.raises(SystemExit, match="--hoyer-alpha -1.0: a weight"):
        recipe.configure(False, 64, None, alpha=-1.0)


def test_sparsified_from_a_run_of_other_sparsify_options_is_refused_before_any_copy(tmp_path, monkeypatch):
    """--sparsified-from a ReLU run into a keep (or another alpha's) run: refused up front, naming what differs,
    instead of training the stage again after copying it; the same options (or a legacy recipe.json whose
    missing keys are the defaults) pass."""
    import copy

    src, work = finished_run(tmp_path / "relu"), tmp_path / "keep"
    legacy = {k: v for k, v in recipe.RECIPE["sparsify"].items()}
    (src / "recipe.json").write_text(json.dumps({"recipe": {**recipe.RECIPE, "sparsify": legacy}}))
    monkeypatch.setattr(recipe, "RECIPE", copy.deepcopy(recipe.RECIPE))
    recipe.copy_sparsified(src, tmp_path / "same")          # same options: copied
    recipe.configure(False, 64, None, activation="keep", alpha=3e-3)
    with pytest.raises(SystemExit, match=r"activation relu there, keep here.*alpha 0.001 there, 0.003 here.*Fix:"):
        recipe.copy_sparsified(src, work)
    assert not work.exists()


def run_script(*args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_convert_recipe.py"), *args], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def run_recipe(*args: str) -> None:
    run_script("--smoke", "--expert-size", "32", "--minutes", "30", *args)


def moefication_points(sweep: dict) -> list:
    return [(p["setting"], p["ffn_compute"], p["ppl"], p["tasks"]) for p in sweep["points"] if p["method"] == "moefication"]


def test_end_to_end_on_a_tiny_model_and_a_sweep_finished_on_a_new_machine(dense_dir, tmp_path):
    """The device flow on a tiny Gemma 3: a run of both methods whose lease ended before MoEfication's points (its
    points cut from the sweep, as session 51's was), then on a new machine (the --work gone) ``--methods
    moefication`` alone, then ``--merge`` of the two: a complete sweep whose MoEfication points are those of a run
    that did it all (the recipe is deterministic). ``--methods moefication`` alone stopped with a missing routers
    stage before its sweep until session 53."""
    dense, work = dense_dir("gemma3_text"), tmp_path / "work"
    run_recipe("--dense", str(dense), "--methods", "d2dmoe-per-layer,moefication", "--work", str(work),
               "--out", str(tmp_path / "first"))
    whole = json.loads((tmp_path / "first" / recipe.SWEEP).read_text())
    run = json.loads((tmp_path / "first" / recipe.RUN).read_text())
    assert whole["complete"] and [p["method"] for p in whole["points"]] == ["d2dmoe"] * len(recipe.TAUS) + \
        ["moefication"] * len(recipe.TOP_K_FRACTIONS)
    assert {"report_d2dmoe-per-layer", "report_moefication", "routers", "routers-moefication", "original"} <= set(run)
    assert run["recipe"]["dense"] == str(dense.resolve()) and run["sweep"]["complete"]
    cut = {**whole, "complete": False, "points": [p for p in whole["points"] if p["method"] != "moefication"]}
    (tmp_path / "first" / recipe.SWEEP).write_text(json.dumps(cut))
    shutil.rmtree(work)                                   # a new machine: every stage trained again
    run_recipe("--dense", str(dense), "--methods", "moefication", "--work", str(work), "--out", str(tmp_path / "second"))
    second = json.loads((tmp_path / "second" / recipe.RUN).read_text())
    assert "routers-moefication" in second and "routers" not in second
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"dense": {}, "points": []}))
    run_script("--merge", str(tmp_path / "first"), str(tmp_path / "second"), "--out", str(quality))
    merged = json.loads(quality.read_text())["gpu_recipe"]
    assert merged["complete"] and len(merged["parts"]) == 2 and len(merged["points"]) == len(whole["points"])
    assert moefication_points(merged) == moefication_points(whole) != []


def test_a_lever_run_starts_from_a_tiny_runs_sparsified_model(dense_dir, tmp_path):
    """The lease's lever steps (``STEP=e16``, ``STEP=adaptlr``) end to end on a tiny Gemma 3: ``--sparsified-from``
    a finished ``--no-sweep`` run converts from that run's source (its --dense here, its GGUF on the device) and
    reuses its sparsify stage, with 16-neuron experts and adapt at another learning rate."""
    dense = dense_dir("gemma3_text")
    run_recipe("--dense", str(dense), "--methods", "d2dmoe-per-layer", "--no-sweep", "--work", str(tmp_path / "a"),
               "--out", str(tmp_path / "out-a"))
    run_recipe("--sparsified-from", str(tmp_path / "a"), "--expert-size", "16", "--adapt-lr", "2.5e-5",
               "--methods", "d2dmoe-per-layer", "--no-sweep", "--work", str(tmp_path / "b"), "--out", str(tmp_path / "out-b"))
    a, b = (json.loads((tmp_path / f"out-{x}" / recipe.RUN).read_text()) for x in "ab")
    first, lever = a["report_d2dmoe-per-layer"], b["report_d2dmoe-per-layer"]
    assert (first["expert_size"], lever["expert_size"]) == (32, 16) and lever["experts_per_layer"] == 16
    assert str(lever["seconds"]["sparsify"]).startswith("skipped") and not str(first["seconds"]["sparsify"]).startswith("skipped")
    assert b["recipe"]["dense"] == str(dense.resolve()) and b["recipe"]["adapt"]["lr"] == 2.5e-5
    assert b["sparsify"] == a["sparsify"] and "sweep" not in b
