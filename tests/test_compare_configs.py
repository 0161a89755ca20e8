"""``benchmarks/compare_configs.py``'s command line: overrides merge into the device config path by path,
and a malformed variant or an unknown shape stops with a message that names it."""

import copy
import os
import sys
from pathlib import Path

import pytest

os.environ["TRITON_INTERPRET"] = "1"  # as in test_tune_kernels: the kernel modules imported now are the interpreted ones
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from compare_configs import parse_case, parse_variant  # noqa: E402

from d2dmoe_kernels.configs import kernel_config, with_overrides  # noqa: E402


def test_overrides_replace_only_the_keys_they_name():
    base = kernel_config("NVIDIA H200")
    before = copy.deepcopy(base)
    label, over = parse_variant('one step={"fused": {"REDUCE_BLOCK_S": 256}, "fused@d2048e128": {"BLOCK_J": 16}}')
    cfg = with_overrides(base, over)
    assert label == "one step"
    assert cfg["fused"] == {**base["fused"], "REDUCE_BLOCK_S": 256}
    assert cfg["fused@d2048e128"] == {"BLOCK_J": 16}  # a shape key the device file lacks is added
    assert cfg["router"] == base["router"] and base == before  # other paths as they were; the cached base untouched
    assert with_overrides(base, {"fused": {"REDUCE_BLOCK_S": 64}})["fused"]["REDUCE_BLOCK_S"] == 64


@pytest.mark.parametrize("text", ["noequals", '={"fused": {}}', 'x={"fused": 3}', "x=[1]", "x={broken"])
def test_malformed_variant_names_itself(text):
    with pytest.raises(SystemExit, match="--variant"):
        parse_variant(text)


def test_cases():
    assert parse_case("gpt2-ffn:64,128") == ("gpt2-ffn", (64, 128))
    assert parse_case("gemma-2b-ffn") == ("gemma-2b-ffn", (128, 256, 512))  # the benchmark's expert sizes
    with pytest.raises(SystemExit, match="unknown shape 'llama'"):
        parse_case("llama:64")
