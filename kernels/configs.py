"""Kernel launch configs, stored as data per device (no run-time autotuning).

``kernels/configs/default.json`` holds the defaults; a file named after the device
(``torch.cuda.get_device_name()`` with spaces as underscores) overrides keys of it. A device with no
file of its own borrows the tuned file of its family (``fallbacks.json``: name fragment -> file), so
an H200 or an H100 PCIe/NVL gets the H100 SXM tuning (same SM count and cache, only bandwidth
differs) instead of the untuned defaults.
"""

import functools
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).with_name("configs")
TUNED_ELEMENT_SIZE = 2  # the device files' tiles were chosen for bf16 / fp16 weights


def own_file_name(device_name: str) -> str:
    """The name of a device's own tuned file: ``torch.cuda.get_device_name()``, spaces as underscores."""
    return device_name.replace(" ", "_") + ".json"


def config_file(device_name: str) -> Path | None:
    """The tuned file a device uses: its own, else its family's (``fallbacks.json``), else None."""
    own = CONFIG_DIR / own_file_name(device_name)
    if own.is_file():
        return own
    fallbacks = json.loads((CONFIG_DIR / "fallbacks.json").read_text())
    return next((CONFIG_DIR / f"{name}.json" for frag, name in fallbacks.items()
                 if not frag.startswith("_") and frag in device_name), None)


def with_overrides(base: dict, overrides: dict) -> dict:
    """``base`` with each path's keys replaced by the override's, path by path (a device file over the
    defaults; a benchmark's variant over a device config). ``base`` is not changed."""
    return {**base, **{path: {**base.get(path, {}), **keys} for path, keys in overrides.items()}}


@functools.lru_cache(maxsize=None)
def kernel_config(device_name: str | None) -> dict:
    cfg = json.loads((CONFIG_DIR / "default.json").read_text())
    cfg.pop("_comment", None)
    tuned = config_file(device_name) if device_name else None
    if tuned is not None:
        cfg = with_overrides(cfg, {path: values for path, values in json.loads(tuned.read_text()).items()
                                   if not path.startswith("_")})
    return cfg


def path_config(cfg: dict, path: str, d: int, expert_size: int) -> dict:
    """A path's config with the shape-specific overrides ("path@d2048", "path@d2048e256") applied."""
    return {**cfg[path], **cfg.get(f"{path}@d{d}", {}), **cfg.get(f"{path}@d{d}e{expert_size}", {})}


def token_tier(cfg: dict, tokens: int, key: str = "by_tokens") -> dict:
    """A path config with its first ``key`` tier that covers ``tokens`` applied:
    ``"by_tokens": [[max_tokens, {overrides}], ...]`` (blocks that suit 16 tokens do not suit 256)."""
    for bound, over in cfg.get(key, ()):
        if tokens <= bound:
            return {**cfg, **over}
    return cfg


def for_element_size(cfg: dict, element_size: int, widths=("BLOCK_K", "BLOCK_N")) -> dict:
    """``cfg`` for weights of ``element_size`` bytes: the tiles' ``widths`` shrink by the ratio to the
    2-byte weights the configs were tuned on (fp32: half), so a tile holds the bytes it was tuned to
    hold and a config that fits shared memory in bf16 fits in fp32 (the H200's 128 x 128 fused tier
    at d2048, T=2-3, asked 344 KB of 227 KB for fp32 weights)."""
    ratio = element_size // TUNED_ELEMENT_SIZE
    if ratio <= 1:
        return cfg
    return {**cfg, **{k: max(16, cfg[k] // ratio) for k in widths if k in cfg}}
