"""The adapt stage: fine-tuning the sparsified model under its own expert selection (converter/adapt.py).

What must hold: the model adapt trains computes exactly what the exported checkpoint serves (the selected
experts' neurons only, at the same taus); an adapt run lowers the converted model's divergence from the
original at the same budget; its stage resumes and is keyed on its options; bad options are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from d2dmoe_converter.adapt import AdaptOptions, expert_of_neuron, select_experts_in_ffns_
from d2dmoe_converter.cli import main as convert_cli
from d2dmoe_converter.convert import (ConvertOptions, expert_counts, expert_state, init_router, layer_experts,
                                      moe_config)
from d2dmoe_converter.dense import load_dense
from d2dmoe_converter.distill_kl import distill_loss
from d2dmoe_converter.hf_model import build_model
from d2dmoe_converter.moe_model import attach_experts, ffn_fraction, run_base, set_selection
from d2dmoe_converter.split import contiguous_order

FAST = ["--router-tokens", "4096", "--router-steps", "200", "--calib-tokens", "1024", "--eval-tokens", "1024",
        "--seq-len", "128", "--expert-size", "32"]
ADAPT = ["--adapt-steps", "8", "--adapt-batch", "4", "--adapt-lr", "1e-3", "--adapt-warmup", "2"]


def test_expert_of_neuron_inverts_the_split():
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    owner = expert_of_neuron(order, 8)
    for e in range(8):   # split_ffn: expert e holds the neurons order[8e : 8e + 8]
        assert set(torch.nonzero(owner == e).flatten().tolist()) == set(order[8 * e : 8 * e + 8].tolist())


@pytest.mark.parametrize("family,selection", [("gemma3_text", "tau"), ("gpt2", "tau"), ("gemma3_text", "layer_tau"),
                                              ("gpt2", "top_k"), ("gemma3_text", "sum")])
def test_training_model_computes_what_the_checkpoint_serves(dense_dir, family, selection):
    """The dense model with each FFN's activation masked to the router's selection gives the logits of the
    D2DMoE reference model (the experts cut from the same weights, the same routers and taus): a shuffled
    split, random routers, taus that leave tokens with one expert and experts with no token."""
    dense = load_dense(dense_dir(family, "relu"))
    opts = ConvertOptions(expert_size=32)
    E, _ = expert_counts(dense.d_ff, opts)
    cfg = moe_config(dense, opts)
    gen = torch.Generator().manual_seed(3)
    orders = {f"layer_{i}": torch.randperm(dense.d_ff, generator=gen) for i in range(dense.num_layers)}
    routers = [init_router(dense.hidden_size, 64, E, gen) for _ in range(dense.num_layers)]
    tau, top_k, layer_tau, reference = 0.6, 0, (), "max"
    if selection == "sum":                        # tau a fraction of the router scores' sum (--reference sum)
        tau, reference = 0.08, "sum"
    if selection == "layer_tau":
        layer_tau = tuple(0.3 + 0.6 * i for i in range(dense.num_layers))   # the last layer: mostly one expert
    elif selection == "top_k":
        tau, top_k = 0.0, 3
    moe = build_model(dense).eval()
    attach_experts(moe, expert_state(dense, layer_experts(dense, cfg, orders), routers), dense.model_type, "relu",
                   reference=reference)
    set_selection(moe, tau, top_k, layer_tau=layer_tau)
    masked = build_model(dense).eval()
    acts = select_experts_in_ffns_(masked, routers, [orders[f"layer_{i}"] for i in range(dense.num_layers)], E, tau,
                                   top_k, layer_tau, reference)
    ids = torch.randint(0, 1000, (3, 40), generator=gen)
    with torch.no_grad():
        want, got = moe(input_ids=ids).logits, masked(input_ids=ids).logits
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    kept = torch.stack([a.keep.float().mean() for a in acts])
    assert (kept > 0).all() and (kept < 1).all()                 # the selection drops some experts, keeps some
    assert ffn_fraction(moe) == pytest.approx(float(kept.mean()), abs=0.01)   # layers of one size: mean of shares
    if selection == "top_k":
        assert torch.allclose(kept, torch.full_like(kept, 3 / E))


def test_dropped_neurons_get_no_gradient(dense_dir):
    """A neuron whose expert no token selects passes no gradient to its gate/up rows: adapt trains only
    what is served."""
    dense = load_dense(dense_dir("gemma3_text", "relu"))
    E = dense.d_ff // 32
    model = build_model(dense)
    order = contiguous_order(dense.d_ff)
    gen = torch.Generator().manual_seed(0)
    routers = [init_router(dense.hidden_size, 64, E, gen) for _ in range(dense.num_layers)]
    acts = select_experts_in_ffns_(model, routers, [order] * dense.num_layers, E, 1.0)   # one expert per token
    ids = torch.randint(0, 1000, (1, 3), generator=gen)   # 3 tokens: at most 3 of the experts run
    model(input_ids=ids).logits.square().mean().backward()
    mlp = model.model.layers[0].mlp
    used = acts[0].keep.reshape(-1, dense.d_ff).any(0)
    grad = mlp.gate_proj.weight.grad.abs().sum(1)
    assert (grad[~used] == 0).all() and (grad[used] > 0).any() and (~used).sum() >= dense.d_ff - 3 * 32


@pytest.fixture(scope="module")
def adapted(dense_dir, tmp_path_factory):
    """A tiny Gemma converted to 50% twice from one work dir: without adapt, then with 8 adapt steps."""
    root = tmp_path_factory.mktemp("adapt")
    base = [str(dense_dir("gemma3_text")), "--sparsify-steps", "4", "--sparsify-batch", "4", "--warmup", "2",
            "--sparsify-lr", "1e-3", "--hoyer-alpha", "0.05", "--budget", "0.5", "--save-every", "4", "--work-dir", str(root / "work"), *FAST]
    assert convert_cli([base[0], str(root / "plain"), *base[1:]]) == 0
    assert convert_cli([base[0], str(root / "adapted"), *base[1:], *ADAPT]) == 0
    return root, base


def kl_to_original(dense_dir, out, stage, ids) -> float:
    """Mean KL(original || checkpoint ``out`` at its selection) over ``ids``; the layers around the experts
    are the dense model of the work dir's ``stage``."""
    original = build_model(load_dense(dense_dir("gemma3_text"))).eval()
    cfg = json.loads((out / "config.json").read_text())
    model = build_model(load_dense(stage)).eval()
    attach_experts(model, load_file(str(out / "model.safetensors")), "gemma3_text", "relu")
    set_selection(model, cfg["d2dmoe"]["tau"], cfg["d2dmoe"]["top_k"], layer_tau=cfg["d2dmoe"].get("layer_tau") or ())
    with torch.no_grad():
        return float(distill_loss(model(input_ids=ids).logits, original(input_ids=ids).logits))


def test_adapt_brings_the_converted_model_closer_to_the_original(adapted, dense_dir):
    """At the same 50% budget (tau scaled back to it after training), the adapted checkpoint's next-token
    distributions are closer (KL) to the original's on held-out text than the plain conversion's; the
    report and the stage keep the numbers before and after."""
    root, _ = adapted
    work = root / "work"
    info = json.loads((work / "adapt" / "stage.json").read_text())
    losses = [r["task_loss"] for r in info["log"]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    report = json.loads((root / "adapted" / "d2dmoe_report.json").read_text())
    plain = json.loads((root / "plain" / "d2dmoe_report.json").read_text())
    assert report["adapt"]["steps"] == 8 and report["adapt"]["before"]["ppl_converted"] == plain["ppl_converted"]
    assert abs(report["ffn_fraction"] - 0.5) <= 0.06 and report["ppl_original"] == plain["ppl_original"]
    assert report["tau"] == info["tau"] and "adapt" in report["seconds"]
    from d2dmoe_converter.corpus import load_corpus, token_sequences
    from d2dmoe_converter.dense import load_tokenizer

    dense = load_dense(dense_dir("gemma3_text"))
    tok = load_tokenizer(dense)
    ids = token_sequences(tok, load_corpus(None, None).heldout, 4, 128, bos=dense.bos_token_id(tok))
    assert kl_to_original(dense_dir, root / "adapted", work / "adapt", ids) < \
        kl_to_original(dense_dir, root / "plain", work / "sparsify", ids)


def test_exported_experts_are_the_adapted_weights(adapted):
    """The checkpoint at tau = 0 reproduces the adapted dense model (the same split, re-cut), not the
    sparsified one it started from."""
    root, _ = adapted
    out, work = root / "adapted", root / "work"
    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    moe = build_model(load_dense(work / "adapt")).eval()
    attach_experts(moe, load_file(str(out / "model.safetensors")), "gemma3_text", "relu", tau=0.0)
    with torch.no_grad():
        got = moe(input_ids=ids).logits
        want = build_model(load_dense(work / "adapt")).eval()(input_ids=ids).logits
        before = build_model(load_dense(work / "sparsify")).eval()(input_ids=ids).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= 1e-4 * scale        # written in the input's dtype (fp32)
    assert (before - want).abs().max() > 100 * (got - want).abs().max()


def test_adapt_stage_is_resumed_and_keyed_on_its_options(adapted, capsys):
    """Rerunning skips every stage, adapt included; another adapt learning rate redoes adapt only."""
    root, base = adapted
    assert convert_cli([base[0], str(root / "again"), *base[1:], *ADAPT]) == 0
    printed = capsys.readouterr().out
    assert all(f"[{s}] done earlier" in printed for s in ("sparsify", "split", "routers", "calibrate", "adapt"))
    other = [*ADAPT[:-4], "--adapt-lr", "5e-4", *ADAPT[-2:]]
    assert convert_cli([base[0], str(root / "other"), *base[1:], *other]) == 0
    printed = capsys.readouterr().out
    assert "[calibrate] done earlier" in printed and "[adapt] done earlier" not in printed


def test_interrupted_adapt_resumes_where_it_stopped(dense_dir, tmp_path, monkeypatch):
    """A run cut after the adapt stage's first saved state resumes from it: the same weights as an uncut run."""
    import d2dmoe_converter.sparsify as sparsify

    base = [str(dense_dir("gemma3_text", "relu")), "--budget", "0.5", "--adapt-save-every", "4", *FAST, *ADAPT]
    assert convert_cli([base[0], str(tmp_path / "clean"), *base[1:], "--work-dir", str(tmp_path / "w1")]) == 0
    real = sparsify.lr_at

    def cut(step, opts):
        if step >= 6:   # steps 0..5 ran (the state saved after step 4), then the run dies
            raise KeyboardInterrupt
        return real(step, opts)

    monkeypatch.setattr(sparsify, "lr_at", cut)
    with pytest.raises(KeyboardInterrupt):
        convert_cli([base[0], str(tmp_path / "cut"), *base[1:], "--work-dir", str(tmp_path / "w2")])
    assert (tmp_path / "w2" / "adapt.partial" / "train_state.pt").is_file()
    monkeypatch.setattr(sparsify, "lr_at", real)
    assert convert_cli([base[0], str(tmp_path / "cut"), *base[1:], "--work-dir", str(tmp_path / "w2")]) == 0
    a, b = load_file(str(tmp_path / "clean" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def test_hoyer_is_only_measured_when_not_in_the_loss():
    """adapt's loss has no Hoyer term: the activation still logs it, without a graph through it."""
    from d2dmoe_converter.sparsify import HoyerActivation, square_hoyer

    act = HoyerActivation().train()
    x = torch.randn(4, 8, requires_grad=True)
    act(x)
    assert act.hoyer.requires_grad
    act.penalised = False
    act(x)
    assert not act.hoyer.requires_grad and act.hoyer.item() == pytest.approx(square_hoyer(torch.relu(x)).item())


def test_adapt_options_train_without_the_hoyer_term():
    opts = AdaptOptions(steps=10, lr=2e-5).training()
    assert opts.alpha == 0.0 and opts.steps == 10 and opts.lr == 2e-5 and opts.activation == "relu"
    # how often the state is saved decides no weight: not in the stage's key
    assert AdaptOptions(steps=10, save_every=3).stage_key() == AdaptOptions(steps=10, save_every=7).stage_key()


@pytest.mark.parametrize("extra,message", [
    (["--adapt-steps", "2", "--router-steps", "0"], "--adapt-steps fine-tunes the model under its routers' selection"),
    (["--adapt-steps", "2", "--budget", "0.5", "--attention-experts", "all"], "--adapt-steps with --attention-experts"),
    (["--adapt-steps", "2", "--budget", "0.5", "--adapt-distill", "2"], "--adapt-distill is a weight in [0, 1]"),
    (["--adapt-steps", "-1"], "--adapt-steps must be >= 0"),
    (["--adapt-steps", "100000", "--adapt-batch", "64", "--budget", "0.5"], "(--adapt-passes)"),
    (["--adapt-steps", "2", "--budget", "0.5", "--adapt-save-every", "0"], "--adapt-save-every must be positive"),
])
def test_bad_adapt_options_write_nothing(dense_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    assert convert_cli([str(dense_dir("gemma3_text")), str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_cut_after_adapt_training_does_not_train_again(dense_dir, tmp_path, monkeypatch):
    """Cut while the adapted model is measured: the rerun measures the saved model, it does not train again."""
    import d2dmoe_converter.convert as convert

    args = [str(dense_dir("gemma3_text", "relu")), str(tmp_path / "out"), "--budget", "0.5", *FAST, *ADAPT,
            "--work-dir", str(tmp_path / "w")]
    real = convert.measure_quality

    def cut(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "measure_quality", cut)
    with pytest.raises(KeyboardInterrupt):
        convert_cli(args)
    assert (tmp_path / "w" / "adapt.partial" / "trained.json").is_file()
    monkeypatch.setattr(convert, "measure_quality", real)
    monkeypatch.setattr(convert, "finetune", lambda *a, **k: pytest.fail("adapt trained again"))
    assert convert_cli(args) == 0
    assert len(json.loads((tmp_path / "w" / "adapt" / "stage.json").read_text())["log"]) == 8
