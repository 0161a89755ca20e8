import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # load_test's server helpers
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tiny_models import make_dense  # noqa: E402


def subprocess_env(**extra):
    """Environment for engine subprocesses: without the Triton interpreter switch the kernel tests set."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(extra)
    return env


def with_pdl(cfg: dict) -> dict:
    """A kernel config with the router tail, fused decode and masked kernels launched as programmatic
    dependents (``"pdl": true``) at every shape key, as a device file may set them."""
    return at_every_key(cfg, ("router", "fused", "masked"), pdl=True)


def at_every_key(cfg: dict, paths: tuple[str, ...], **keys) -> dict:
    """``cfg`` with ``keys`` set in the paths' configs and in each of their shape keys (``path@d..``)."""
    return {k: {**v, **keys} if isinstance(v, dict) and k.split("@")[0] in paths else v for k, v in cfg.items()}


def with_prefetch(cfg: dict, fused: int = 3) -> dict:
    """A kernel config whose fused decode kernels ask L2 for their slices' weights first (``PREFETCH``
    bits: 2 w_in / w_up, 1 w_out) and whose router launches prefetch their weights before they wait."""
    out = at_every_key(cfg, ("fused",), PREFETCH=fused)
    out["router"] = {**cfg["router"], "HIDDEN_PREFETCH": 1, "TAIL_PREFETCH": 1}
    return out


def with_tma(cfg: dict) -> dict:
    """A kernel config whose fused decode kernels read their weight tiles through tensor descriptors."""
    return at_every_key(cfg, ("fused",), TMA=1)


def count_descriptors(monkeypatch) -> list:
    """The (rows, cols) blocks of every tensor descriptor the fused decode launcher makes from now on."""
    import d2dmoe_kernels.expert_decode_fused as fused

    made, real = [], fused.rows_descriptor
    monkeypatch.setattr(fused, "rows_descriptor", lambda *a: made.append(a[1:]) or real(*a))
    return made


@pytest.fixture(scope="session")
def dense_dir(tmp_path_factory):
    """Factory: tiny dense checkpoint of a family (cached per session)."""
    root = tmp_path_factory.mktemp("dense")
    cache = {}

    def get(family: str, activation: str | None = None) -> Path:
        key = (family, activation)
        if key not in cache:
            cache[key] = make_dense(family, root / f"{family}-{activation or 'default'}", activation=activation)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def converted_dir(tmp_path_factory, dense_dir):
    """Factory: tiny D2DMoE checkpoint converted by the d2dmoe-convert command line (cached)."""
    from d2dmoe_converter.cli import main as convert_cli

    root = tmp_path_factory.mktemp("d2dmoe")
    cache = {}

    def get(family: str, relufy: bool = False, expert_size: int = 32, tau: float = 0.0) -> Path:
        key = (family, relufy, expert_size, tau)
        if key not in cache:
            out = root / f"{family}-{'relu' if relufy else 'orig'}-e{expert_size}-t{tau}"
            args = [str(dense_dir(family)), str(out), "--expert-size", str(expert_size), "--tau", str(tau)]
            assert convert_cli(args + (["--relu"] if relufy else [])) == 0
            cache[key] = out
        return cache[key]

    return get
