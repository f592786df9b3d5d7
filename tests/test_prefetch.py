"""Expert prefetching on the tiny model: `none` is today's run, the oracle removes demand misses,
every prefetched byte is paid for, and overlapping never makes a layer slower."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from slicemoe.cache import SliceCache
from slicemoe.config import CacheConfig, EvalConfig, HardwareConfig, PrefetchConfig, RunConfig
from slicemoe.hardware import charge
from slicemoe.models import read_shape
from slicemoe.replay import replay
from slicemoe.run import ConfigError, load, record, run, validate

BASE = RunConfig(eval=EvalConfig(limit=6, max_new_tokens=24), batch_size=3)


@pytest.fixture(scope="module")
def loaded():
    return load(BASE)


@pytest.fixture(scope="module")
def stream(loaded):
    """BASE's request stream: with top-k routing, every cache and prefetcher replays this one
    pass, as a sweep does (the replay equals the model in the loop: the first test and
    test_a_replay_prefetches_exactly_as_the_model_in_the_loop)."""
    return record(BASE, loaded)


def with_prefetch(predictor: str, **kw) -> RunConfig:
    return dataclasses.replace(
        BASE, prefetch=PrefetchConfig(name=predictor, predictor=predictor), **kw
    )


def test_none_is_the_run_without_prefetching(loaded, stream):
    # The replay has no prefetching at all; the in-loop run with prefetch=none matches it (to
    # the last bits of float sums taken in another order).
    got = run(BASE, loaded)
    want = replay(stream, BASE)
    for name in ("flash_bytes_decode", "miss_rate", "miss_rate_hbn", "decode_tokens"):
        assert got[name] == want[name], name
    for name in ("energy_decode_j", "latency_decode_s"):
        assert got[name] == pytest.approx(want[name], rel=1e-12), name
    assert got["flash_bytes_prefetch"] == 0 and np.isnan(got["prefetch_recall"])


def test_the_oracle_leaves_no_demand_miss_when_two_layers_fit(stream):
    # Room for two layers' experts, every slice of them: the next layer's slices (LSB included
    # for the experts the recorded pass computed at high precision) arrive while this layer
    # computes. Only decode step 0's first layer, with no layer before it, misses.
    sizes = read_shape(None)
    full = 2 * sizes.top_k * (3 * sizes.hidden * sizes.moe_intermediate) * 2
    cfg = dataclasses.replace(
        with_prefetch("oracle", cache=CacheConfig(frac=None, bytes=full)),
        prefetch=PrefetchConfig(name="oracle", predictor="oracle", slices="critical"),
        policy=dataclasses.replace(BASE.policy, warmup_steps=1),
    )
    r = replay(stream, cfg)
    assert r["prefetch_recall"] == 1.0
    assert r["flash_bytes_demand"] > 0  # step 0
    assert r["miss_rate_steady"] == 0.0 and r["flash_bytes_demand_steady"] == 0.0
    none = replay(stream, dataclasses.replace(cfg, prefetch=PrefetchConfig()))
    assert none["miss_rate_steady"] > 0.1


def test_every_prefetched_byte_is_charged_used_or_not(stream):
    r = replay(stream, with_prefetch("next_gate", cache=CacheConfig(frac=0.25)))
    assert 0 < r["prefetch_precision"] < 1  # some prefetches are wasted ...
    flash = r["flash_bytes_demand"] + r["flash_bytes_prefetch"]
    assert r["flash_bytes_decode"] == flash
    # ... and Flash energy is every byte read, at the profile's pJ/bit.
    pj = HardwareConfig().flash_pj_per_bit
    assert r["energy_decode_flash_j"] == pytest.approx(flash * 8 * pj * 1e-12)


def test_overlapping_a_fetch_never_makes_a_layer_slower():
    rng = np.random.default_rng(0)
    hw = HardwareConfig()
    ops, dram, flash = (rng.uniform(0, s, 1000) for s in (5e9, 5e6, 5e6))
    ahead = flash * rng.uniform(0, 1, 1000)  # part of the same bytes, fetched ahead
    with_ahead = charge(hw, ops, dram, flash, ahead)
    on_demand = charge(hw, ops, dram, flash)
    assert (with_ahead.latency_s <= on_demand.latency_s).all()
    assert (with_ahead.flash_j == on_demand.flash_j).all()
    assert (charge(hw, ops, dram, flash, 0.0).latency_s == on_demand.latency_s).all()


@pytest.mark.parametrize("frac", [0.25, 0.5])
def test_a_perfect_predictor_is_never_slower_than_none(stream, frac):
    oracle = replay(stream, with_prefetch("oracle", cache=CacheConfig(frac=frac)))
    none = replay(stream, dataclasses.replace(BASE, cache=CacheConfig(frac=frac)))
    assert oracle["latency_decode_s_per_token"] <= none["latency_decode_s_per_token"]


def test_next_gate_predicts_far_above_chance_and_prev_token_covers_layer_0(stream):
    shape = read_shape(None)
    chance = shape.top_k / shape.num_experts  # 4 of 32
    gate = replay(stream, with_prefetch("next_gate"))
    assert gate["prefetch_recall"] > 3 * chance
    per_layer = gate["curves"]["prefetch_recall_layer"]
    assert np.isnan(per_layer[0]) and min(per_layer[1:]) > chance  # no input for layer 0
    prev = replay(stream, with_prefetch("prev_token"))
    assert prev["curves"]["prefetch_recall_layer"][0] > chance


def test_a_prefetch_entered_at_the_lru_end_is_the_next_victim():
    for eviction in ("lru", "fifo", "lfu"):
        c = SliceCache(3, {"MSB": 1, "LSB": 1, "FULL": 2}, 2, 4, eviction)
        c.request((0, 0, "MSB"))
        c.request((0, 1, "MSB"))
        assert c.prefetch((1, 2, "MSB"), cold=True) == 1
        assert c.prefetch((1, 2, "MSB"), cold=True) == 0  # already in DRAM: nothing moves
        c.request((0, 3, "MSB"))  # full: the cold prefetch goes first
        assert (1, 2, "MSB") not in c and (0, 0, "MSB") in c, eviction
        assert c.stats.prefetch_bytes == 1 and c.stats.prefetch_used_bytes == 0
    # Predicted again while in DRAM, a slice is refreshed: the next fetch evicts another.
    c = SliceCache(2, {"MSB": 1, "LSB": 1, "FULL": 2}, 2, 4, "lru")
    c.request((0, 0, "MSB"))
    c.request((0, 1, "MSB"))
    assert c.prefetch((0, 0, "MSB")) == 0
    assert c.prefetch((1, 2, "MSB")) == 1
    assert (0, 0, "MSB") in c and (0, 1, "MSB") not in c
    assert c.request((1, 2, "MSB")) and c.stats.prefetch_used_bytes == 1


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(prefetch=PrefetchConfig(predictor="next_layer")), "prefetch.predictor.*unknown"),
        (dict(prefetch=PrefetchConfig(predictor="next_gate", top_m=2)), "prefetch.top_m"),
        (dict(prefetch=PrefetchConfig(predictor="oracle"),
              policy=dataclasses.replace(BASE.policy, routing="cache_prior")),
         "prefetch.predictor: oracle reads the future"),
        (dict(prefetch=PrefetchConfig(predictor="next_gate"),
              cache=CacheConfig(eviction="belady")), "prefetch.predictor: Belady"),
        (dict(prefetch=PrefetchConfig(predictor="next_gate", slices="lsb")), "prefetch.slices"),
    ],
)  # fmt: skip
def test_bad_prefetch_settings_name_the_field(change, message):
    with pytest.raises(ConfigError, match=message):
        validate(dataclasses.replace(BASE, **change))


@pytest.mark.parametrize(
    "predictor, slices, insert, eviction, frac",
    [
        ("next_gate", "msb", "mru", "lru", 0.25),
        ("next_gate", "critical", "lru", "lfu", 0.15),
        ("prev_token", "critical", "mru", "fifo", 0.25),
        ("prev_token", "msb", "lru", "lru", 0.5),
    ],
)
def test_a_replay_prefetches_exactly_as_the_model_in_the_loop(
    loaded, stream, predictor, slices, insert, eviction, frac
):
    cfg = dataclasses.replace(
        BASE,
        prefetch=PrefetchConfig(name=predictor, predictor=predictor, slices=slices, insert=insert,
                                top_m=6 if predictor == "next_gate" else 0),
        cache=CacheConfig(frac=frac, eviction=eviction),
    )  # fmt: skip
    got = replay(stream, cfg)  # the cache and the prefetcher are not in the stream
    want = run(cfg, loaded)
    for name, value in want.items():
        if name in ("wall_s", "trace_path", "curves", "problems"):
            continue
        assert got[name] == pytest.approx(value, rel=1e-12, nan_ok=True), name
    assert got["problems"] == want["problems"]
    for name, curve in want["curves"].items():
        assert got["curves"][name] == pytest.approx(curve, rel=1e-12, nan_ok=True), name
    assert want["flash_bytes_prefetch"] > 0 or predictor == "prev_token"


@pytest.mark.parametrize("routing", ["cache_prior", "cumsum", "max_rank"])
@pytest.mark.parametrize("predictor", ["next_gate", "prev_token"])
def test_prefetching_runs_in_the_loop_with_cache_aware_routing(loaded, routing, predictor):
    # Three sequences, one batch: what is checked holds at every step.
    cfg = dataclasses.replace(
        with_prefetch(predictor, cache=CacheConfig(frac=0.15)),
        policy=dataclasses.replace(BASE.policy, routing=routing, lam=0.2),
        eval=dataclasses.replace(BASE.eval, limit=3),
    )
    r = run(cfg, loaded)
    assert np.isfinite([r[m] for m in ("energy_decode_j", "latency_decode_s")]).all()
    assert 0 < r["prefetch_recall"] <= 1
    assert r["flash_bytes_decode"] == r["flash_bytes_demand"] + r["flash_bytes_prefetch"]
    if predictor == "next_gate":  # prev_token's picks were just used: in DRAM already
        assert r["flash_bytes_prefetch"] > 0
