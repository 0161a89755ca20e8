"""d2dmoe-demo's options reach the conversion (the run itself is the README's main job, too slow for CI)."""

import pytest

import d2dmoe_converter.convert as convert_module
from d2dmoe_converter.adapt import AdaptOptions
from d2dmoe_vllm import demo


class Stop(Exception):
    """Raised by the recorded conversion so the demo stops before it starts vLLM."""


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    def fake_convert(src, out, opts):
        calls.append((src, out, opts))
        raise Stop

    monkeypatch.setattr(convert_module, "convert", fake_convert)
    return calls


@pytest.mark.parametrize("steps", [0, 30])
def test_adapt_steps_reach_the_conversion(recorded, tmp_path, steps):
    model = tmp_path / "model.gguf"
    args = ["--model", str(model), "--work-dir", str(tmp_path / "work")] + (["--adapt-steps", str(steps)] if steps else [])
    with pytest.raises(Stop):
        demo.main(args)
    (src, out, opts), = recorded
    assert src == model
    assert opts.adapt == AdaptOptions.few_minutes(steps)
    assert opts.adapt.steps == steps and opts.adapt.batch == 2 and opts.adapt.seq_len == 256
    # an adapted checkpoint gets its own folder: the plain one of the same budget is not overwritten
    assert out.name == "model-d2dmoe-e64-b0.75" + (f"-adapt{steps}" if steps else "")
    assert opts.calibrate.budget == 0.75


@pytest.mark.parametrize("reference", ["max", "sum"])
def test_reference_reaches_the_conversion(recorded, tmp_path, reference):
    model = tmp_path / "model.gguf"
    with pytest.raises(Stop):
        demo.main(["--model", str(model), "--work-dir", str(tmp_path / "work"), "--reference", reference])
    (_, out, opts), = recorded
    assert opts.calibrate.reference == reference
    assert out.name == "model-d2dmoe-e64-b0.75" + ("-sum" if reference == "sum" else "")   # its own folder


@pytest.mark.parametrize("bad, message", [(["--adapt-steps", "-3"], "--adapt-steps must be >= 0, got -3"),
                                          (["--budget", "1.5"], "--budget 1.5 is out of range")])
def test_bad_options_are_refused_before_any_work(recorded, tmp_path, capsys, monkeypatch, bad, message):
    monkeypatch.setattr(demo, "default_model_gguf", lambda cache: pytest.fail("the model was assembled"))
    with pytest.raises(SystemExit) as err:
        demo.main(["--work-dir", str(tmp_path / "work")] + bad)
    assert err.value.code == 2
    assert message in capsys.readouterr().err
    assert recorded == []
