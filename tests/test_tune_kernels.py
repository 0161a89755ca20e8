"""The offline tuner's gemm-path rule (``tune_kernels.gemm_tier``): it reproduces the H200 tiers from
the measurements they were set from, and its bounds and blocks follow the rule on made-up times.
Its candidates are timed on the path they are for, with the device's other choices (dispatch, run on
meta tensors with the paths recorded instead of launched), and written without losing any of them."""

import itertools
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
from tune_kernels import (ALL_TOKENS, GEMM_BLOCKS, GRID, SHAPES as TUNED_SHAPES, candidate_config,  # noqa: E402
                          candidate_key, gemm_tier, taking_path)
from tune_kernels import acting_values as acting  # noqa: E402

import torch  # noqa: E402

from d2dmoe_kernels import dispatch  # noqa: E402
from d2dmoe_kernels.configs import kernel_config, path_config  # noqa: E402

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


DEVICES = ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
PATH_FUNCTIONS = {"fused": "fused_decode_experts", "balanced": "balanced_decode_experts", "decode": "decode_experts",
                  "persistent": "persistent_decode_experts",
                  "grouped": "grouped_experts", "masked": "masked_dense_experts", "gemm": "gemm_masked_experts",
                  "dense": "dense_experts"}


@pytest.fixture
def taken(monkeypatch):
    """``taken(cfg, d, dff, gated, es, T)`` -> (path, its config) that dispatch picks, nothing launched."""
    calls = []
    for path, name in PATH_FUNCTIONS.items():
        monkeypatch.setattr(dispatch, name, lambda *a, _path=path, **k: calls.append((_path, a)))
    monkeypatch.setattr(dispatch, "route", lambda *a: (None, None, 0.5))
    monkeypatch.setattr(dispatch, "router_hidden", lambda *a: None)
    monkeypatch.setattr(dispatch, "stacked_up_view", lambda *a: "stacked")  # gemm taken wherever it is on

    def run(cfg, d, dff, gated, es, T):
        E, m = dff // es, lambda *shape: torch.empty(*shape, device="meta")
        dispatch.dynamic_k_experts_triton(m(T, d), m(128, d), m(E, 128), 0.99, 0, m(E, es, d),
                                          m(E, es, d) if gated else None, m(E, es, d), None, m(d), "relu", m(3), cfg)
        (path, args), = calls
        calls.clear()
        return path, next(a for a in args if isinstance(a, dict))
    return run


def own_router(dev, d, es):
    return acting(dev, "fused", d, es, 1).get("own_router", False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", sorted(GRID))
def test_candidates_are_timed_on_their_path(taken, device, path):
    """Every shape and grid candidate: dispatch runs the tuned path at its T, with the candidate's values
    and the device's other keys (own_router, split_tail, tiers at other T)."""
    dev = kernel_config(device)
    T, grid = GRID[path]
    for (d, dff, gated, es), cand in itertools.product(TUNED_SHAPES, (grid[0], grid[-1])):
        if path == "balanced" and own_router(dev, d, es):
            continue  # the tuner skips these shapes (the fused kernel runs the router's tail)
        got, cfg = taken(candidate_config(dev, path, d, es, T, cand), d, dff, gated, es, T)
        assert got == path, (d, es, got)
        assert cfg.items() >= cand.items(), (d, es, cfg, cand)
        if path in ("fused", "decode", "grouped"):
            rest = lambda c: {k: v for k, v in c.items() if k not in cand and k not in ("max_tokens", "by_tokens")}  # noqa: E731
            assert rest(cfg) == rest(acting(dev, path, d, es, T)), (d, es)


def test_decode_tuning_reached_masked_before(taken):
    """The bug taking_path mends: the H200 sends T=16 to the masked path, where decode was tuned."""
    dev = kernel_config("NVIDIA H200")
    T, grid = GRID["decode"]
    d, dff, gated, es = TUNED_SHAPES[-1]
    shaped = {**dev, f"decode@d{d}e{es}": candidate_key(dev, "decode", d, es, T, grid[0])}
    assert taken(shaped, d, dff, gated, es, T)[0] == "masked"
    assert taken(taking_path(shaped, "decode", d, es, T), d, dff, gated, es, T)[0] == "decode"


@pytest.mark.parametrize("path", ["fused", "balanced"])
def test_tuning_reaches_its_path_past_the_persistent_one(taken, path):
    """A device file with the one-launch decode path on would take T=1 before the fused kernel: the
    tuner switches it off at the tuned shape, so fused / balanced candidates time their own path."""
    dev = kernel_config("NVIDIA H200")
    dev = {**dev, "persistent": {**dev["persistent"], "max_tokens": 4}}
    T, grid = GRID[path]
    d, dff, gated, es = TUNED_SHAPES[-1]
    assert taken(dev, d, dff, gated, es, T)[0] == "persistent"
    assert taken(candidate_config(dev, path, d, es, T, grid[0]), d, dff, gated, es, T)[0] == path


@pytest.mark.parametrize("device", DEVICES)
def test_fused_reference_is_the_device_config(taken, device):
    """What balanced is compared against: the device's fused kernel, its config at that T unchanged."""
    dev = kernel_config(device)
    for d, dff, gated, es in TUNED_SHAPES:
        top = path_config(dev, "fused", d, es)["max_tokens"]
        for t in sorted({1, top}):
            got, cfg = taken(taking_path(dev, "fused", d, es, t), d, dff, gated, es, t)
            assert got == "fused"
            cfg.pop("by_tokens", None)
            assert cfg == {**acting(dev, "fused", d, es, t), "max_tokens": t}, (d, es, t)


def test_written_key_keeps_the_other_tiers():
    """Re-tuning the fused kernel at T=1 on the H200 changes the T=1 tier and nothing else: the T=2-3
    tier with TMA, split_tail and BLOCK_N stay."""
    dev = kernel_config("NVIDIA H200")
    cand = GRID["fused"][1][0]
    for es in (256, 512):
        key = f"fused@d2048e{es}"
        written = candidate_key(dev, "fused", 2048, es, 1, cand)
        new = {**dev, key: written}
        assert acting(new, "fused", 2048, es, 1).items() >= cand.items()
        assert acting(new, "fused", 2048, es, 1) != acting(dev, "fused", 2048, es, 1)
        for t in (2, 3, 4):
            assert acting(new, "fused", 2048, es, t) == acting(dev, "fused", 2048, es, t)
        assert acting(new, "fused", 2048, es, 3)["TMA"] == 1
        assert {k: v for k, v in written.items() if k != "by_tokens"} == \
            {k: v for k, v in dev[key].items() if k != "by_tokens"}
    # a key without tiers takes the candidate itself, and keeps what the grid does not set
    written = candidate_key({**dev, "fused@d768e64": {"BLOCK_N": 64}}, "fused", 768, 64, 1, cand)
    assert written == {"BLOCK_N": 64, **cand}


def test_shapes_option():
    from tune_kernels import tuned_shapes
    assert tuned_shapes("") == TUNED_SHAPES
    assert tuned_shapes("768:64, 2048:512") == [TUNED_SHAPES[0], TUNED_SHAPES[-1]]
    with pytest.raises(SystemExit, match=r"unknown --shapes \['768:32'\]"):
        tuned_shapes("768:32")


def test_device_values_are_a_candidate():
    """The H200's T=1 tier at d2048 (64 x 128 tiles, 4 stages: attempt 23) is not a grid point: it is
    timed first, so a re-tune keeps it unless a grid point is faster; values already in the grid lead
    it and are not timed twice."""
    from tune_kernels import candidates
    dev = kernel_config("NVIDIA H200")
    grid = GRID["fused"][1]
    got = candidates(dev, "fused", 2048, 256)
    assert got[0] == {"BLOCK_J": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4, "BLOCK_N_REDUCE": 32}
    assert got[1:] == grid
    got = candidates(dev, "fused", 768, 64)
    assert got[0] == {k: acting(dev, "fused", 768, 64, 1)[k] for k in grid[0]}
    assert sorted(map(str, got)) == sorted(map(str, grid))


def test_a_candidate_must_beat_the_device_by_the_margin():
    from tune_kernels import KEEP_MARGIN, pick
    now, other, third = {"BLOCK_J": 64}, {"BLOCK_J": 32}, {"BLOCK_J": 16}
    assert pick([(10.0, now), (10.0 * KEEP_MARGIN + 0.01, other), (11.0, third)], now) == (10.0, now)
    assert pick([(10.0, now), (10.0 * KEEP_MARGIN - 0.01, other)], now) == (10.0 * KEEP_MARGIN - 0.01, other)
    assert pick([(11.0, other), (10.5, third)], now) == (10.5, third)  # the device's values failed to compile
