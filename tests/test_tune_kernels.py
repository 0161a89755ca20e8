"""The offline tuner's gemm-path rule (``tune_kernels.gemm_tier``): it reproduces the H200 tiers from
the measurements they were set from, and its bounds and blocks follow the rule on made-up times."""

import json
import os
import sys
from pathlib import Path

import pytest

# bench_kernels imports the kernel modules: built now, they must be the interpreted ones the kernel
# test files (which assert it) expect, whichever file pytest collects first. Nothing here launches a kernel.
os.environ["TRITON_INTERPRET"] = "1"
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_kernels import SHAPES  # noqa: E402
from tune_kernels import ALL_TOKENS, GEMM_BLOCKS, gemm_tier  # noqa: E402

PROBE = ROOT / "benchmarks" / "results" / "attempts" / "24-probe-gemm-path-round3.json"
CANDIDATES = {"gemm-64x128": 0, "gemm-32x256": 1}


def probe_times():
    """{(d, e): {T: {"device"|i: {routing: us}}}} from the attempt 24 round-3 probe (speed-ups -> times)."""
    out = {}
    for r in json.loads(PROBE.read_text())["rows"]:
        d = SHAPES[r["shape"]][0]
        routing = "all" if r["fraction"] == 1.0 else r["routing"]
        per_t = out.setdefault((d, r["expert_size"]), {}).setdefault(r["tokens"], {})
        for name, key in [("device", "device"), *CANDIDATES.items()]:
            per_t.setdefault(key, {})[routing] = r["dense_us"] / r[name]
    return out


def test_rule_reproduces_the_h200_tiers():
    cfg = json.loads((ROOT / "kernels" / "configs" / "NVIDIA_H200.json").read_text())
    times = probe_times()
    assert len(times) == 9
    for (d, e), per_t in times.items():
        tier = gemm_tier(per_t)
        want = cfg.get(f"gemm@d{d}e{e}")
        if want is None:  # off on this shape
            assert tier["max_tokens"] == 0, (d, e, tier)
        else:
            assert tier == want, (d, e, tier, want)


def flat(device, mine, tokens=(64, 256, 1024, 4096)):
    """Times where every T has the same device / candidate-0 / candidate-1 times (per routing)."""
    return {t: {"device": dict(device(t)), **{i: dict(m(t)) for i, m in enumerate(mine)}} for t in tokens}


def times_of(ind, shared, all_):
    return lambda t: {"independent": ind, "shared": shared, "all": all_}


def test_no_win_is_off():
    same = times_of(10.0, 10.0, 10.0)
    assert gemm_tier(flat(same, [same, same]))["max_tokens"] == 0


@pytest.mark.parametrize("rule", ["gain", "worst", "independent"])
def test_each_condition_can_refuse(rule):
    dev = times_of(10.0, 8.0, 20.0)
    mine = {"gain": times_of(10.0, 8.0, 19.9),          # better worst case, but < 2% geometric gain
            "worst": times_of(8.0, 6.0, 21.0),          # large gain, slower worst case
            "independent": times_of(10.6, 6.0, 12.0)}[rule]  # gives up > 5% at 30% independent
    assert gemm_tier(flat(dev, [mine, mine]))["max_tokens"] == 0


def test_bounds_at_geometric_midpoints_and_blocks_that_won_most():
    dev = times_of(10.0, 10.0, 10.0)
    win = times_of(8.0, 8.0, 8.0)
    lose = times_of(12.0, 12.0, 12.0)
    between = lambda t: win(t) if t in (256, 1024) else lose(t)  # noqa: E731
    tier = gemm_tier(flat(dev, [lose, between]))
    assert (tier["min_tokens"], tier["max_tokens"]) == (128, 2048)
    assert {k: tier[k] for k in GEMM_BLOCKS[1]} == GEMM_BLOCKS[1]
    tier = gemm_tier(flat(dev, [win, lose]))  # wins from the smallest to the largest measured T
    assert (tier["min_tokens"], tier["max_tokens"]) == (64, ALL_TOKENS)
    assert {k: tier[k] for k in GEMM_BLOCKS[0]} == GEMM_BLOCKS[0]


def test_longest_run_wins():
    dev = times_of(10.0, 10.0, 10.0)
    two_runs = lambda t: times_of(8.0, 8.0, 8.0)(t) if t in (64, 1024, 4096) else times_of(12.0, 12.0, 12.0)(t)  # noqa: E731
    tier = gemm_tier(flat(dev, [two_runs, two_runs]))
    assert (tier["min_tokens"], tier["max_tokens"]) == (512, ALL_TOKENS)


def test_equal_runs_take_the_larger_gain():
    dev = times_of(10.0, 10.0, 10.0)
    marginal = {64: 9.7, 4096: 6.0}  # two single-T wins: the larger gain decides
    mine = lambda t: times_of(marginal.get(t, 12.0), marginal.get(t, 12.0), marginal.get(t, 12.0))(t)  # noqa: E731
    tier = gemm_tier(flat(dev, [mine, mine]))
    assert (tier["min_tokens"], tier["max_tokens"]) == (2048, ALL_TOKENS)


def test_rule_on_the_tuner_run():
    """The tuner's own H200 run (db0d35a, log beside the probe): the rule's choice from its lines."""
    import re
    log = (PROBE.parent / "24-tune-gemm-db0d35a.log").read_text()
    times = {}
    for d, e, t, rest in re.findall(r"d=(\d+) e=(\d+) T=(\d+) gemm: (.*) us", log):
        per = {}
        for part in rest.split("; "):
            key, vals = part.split(" ")
            ind, shared, all_ = map(float, vals.split("/"))
            per["device" if key == "device" else int(key)] = {"independent": ind, "shared": shared, "all": all_}
        times.setdefault((int(d), int(e)), {})[int(t)] = per
    big = {"min_tokens": 8192, "max_tokens": ALL_TOKENS, **GEMM_BLOCKS[1]}
    assert gemm_tier(times[(768, 128)]) == big                   # T=1024 and T=16384 both win alone
    assert gemm_tier(times[(768, 32)]) == {"min_tokens": 128, "max_tokens": ALL_TOKENS, **GEMM_BLOCKS[0]}
    # 270M e=32: T=1024 gained 1.9% in this run (3.3% in the probe): the range starts one step later
    assert gemm_tier(times[(640, 32)]) == {"min_tokens": 2048, "max_tokens": 8192, **GEMM_BLOCKS[0]}
    for shape in [(2048, 128), (2048, 256), (2048, 512), (640, 64), (640, 128)]:
        assert gemm_tier(times[shape])["max_tokens"] == 0, shape


def test_blocks_run_only_where_they_win():
    """A T won only by the other blocks does not join the run of the blocks that are picked."""
    dev = times_of(10.0, 10.0, 10.0)
    a = lambda t: times_of(10.5, 10.5, 10.5)(t) if t == 256 else times_of(8.0, 8.0, 8.0)(t)  # noqa: E731
    b = lambda t: times_of(9.0, 9.0, 9.0)(t) if t == 256 else times_of(12.0, 12.0, 12.0)(t)  # noqa: E731
    tier = gemm_tier(flat(dev, [a, b], tokens=(64, 256, 1024, 4096)))
    assert (tier["min_tokens"], tier["max_tokens"]) == (512, ALL_TOKENS)
    assert {k: tier[k] for k in GEMM_BLOCKS[0]} == GEMM_BLOCKS[0]
