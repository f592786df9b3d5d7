"""Replay from a recorded request stream equals the run with the model in the loop."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from slicemoe import traces
from slicemoe.config import (
    BitsConfig,
    CacheConfig,
    EvalConfig,
    HardwareConfig,
    PolicyConfig,
    PrefetchConfig,
    RunConfig,
)
from slicemoe.hardware import PROFILES
from slicemoe.models import read_shape
from slicemoe.replay import miss_ratio_curve, replay, replayable, stream_key
from slicemoe.run import METRICS, capacity_bytes, load, record, record_packed, run
from slicemoe.stream import Stream

# On one xdist worker, so that the recorded stream is built once.
pytestmark = pytest.mark.xdist_group("test_replay")

BASE = RunConfig(eval=EvalConfig(limit=3, max_new_tokens=16), batch_size=2)
BITS = {
    "mat84": BitsConfig(),
    "mat42": BitsConfig(name="mat42", high=4, low=2),
    "mat84_base": BitsConfig(name="mat84_base", scheme="base"),
    "int8": BitsConfig(name="int8", high=8, low=None),
}


def draw(rng: np.random.Generator) -> RunConfig:
    """A random replayable configuration (no Belady: its in-loop run is itself a replay)."""
    bits_name = str(rng.choice(list(BITS)))
    bits = BITS[bits_name]
    precisions = ["high"] if bits.low is None else ["high", "low", "dbsc"]
    policy = PolicyConfig(
        precision=str(rng.choice(precisions)),
        tau=float(rng.choice([0.3, 0.5])),
        warmup=str(rng.choice(["empty", "last_layer", "random", "lru", "pcw"])),
        warmup_steps=int(rng.choice([0, 5, 10])),
    )
    if rng.random() < 0.8:
        cache = CacheConfig(frac=float(rng.choice([0.05, 0.1, 0.25, 0.6])))
    else:
        cache = CacheConfig(frac=None, bytes=int(rng.integers(300_000, 2_000_000)))
    cache = replace(cache, eviction=str(rng.choice(["lru", "lfu", "fifo"])))
    hw = PROFILES[str(rng.choice(sorted(PROFILES)))]
    hw = replace(hw, overlap_flash=bool(rng.random() < 0.3))
    prefetch = PrefetchConfig()
    if rng.random() < 0.3:
        predictor = str(rng.choice(["next_gate", "prev_token"]))
        prefetch = PrefetchConfig(
            name=predictor,
            predictor=predictor,
            top_m=int(rng.choice([0, 6])),
            slices=str(rng.choice(["msb", "critical"])),
            insert=str(rng.choice(["mru", "lru"])),
        )
    return replace(BASE, bits=bits, policy=policy, cache=cache, hardware=hw, prefetch=prefetch)


def same(a: float, b: float) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b or math.isclose(a, b, rel_tol=1e-9)


def facets(cfg: RunConfig) -> set[tuple]:
    """The choices `draw` makes, as (field, value) pairs."""
    p, c, h, f = cfg.policy, cfg.cache, cfg.hardware, cfg.prefetch
    return {
        ("bits", cfg.bits.name), ("precision", p.precision), ("tau", p.tau),
        ("warmup", p.warmup), ("warmup_steps", p.warmup_steps), ("bytes", c.frac is None),
        ("eviction", c.eviction), ("hardware", h.name), ("overlap", h.overlap_flash),
        ("predictor", f.predictor), ("top_m", f.top_m), ("slices", f.slices),
        ("insert", f.insert),
    }  # fmt: skip


def test_replay_equals_the_model_in_the_loop_on_10_random_configurations():
    """10 draws that take every value of every choice at least once (checked: a seed or a `draw`
    that covers less fails here); each in-loop run is the expensive part."""
    rng = np.random.default_rng(151)
    configs = [draw(rng) for _ in range(10)]
    every = set().union(*(facets(draw(np.random.default_rng(s))) for s in range(200)))
    assert set().union(*(facets(c) for c in configs)) == every
    loaded, streams = {}, {}
    checked = 0
    for cfg in configs:
        key = cfg.bits.name
        if key not in loaded:
            loaded[key] = load(cfg)
        skey = stream_key(cfg)
        if skey not in streams:
            streams[skey] = record(cfg, loaded[key])
        expected = run(cfg, loaded[key])
        got = replay(streams[skey], cfg)
        for m in METRICS:
            if m != "wall_s":
                assert same(expected[m], got[m]), (cfg, m, expected[m], got[m])
        assert expected["problems"] == got["problems"]
        for name, curve in expected["curves"].items():
            assert len(curve) == len(got["curves"][name]), name
            assert all(same(x, y) for x, y in zip(curve, got["curves"][name])), (cfg, name)
        checked += 1
    assert checked == 10
    # Several configurations share each stream: that is the point.
    assert len(streams) < len(configs)


@pytest.fixture(scope="module")
def loaded():
    return load(BASE)


@pytest.fixture(scope="module")
def stream(loaded):
    return record(BASE, loaded)


def test_replayed_trace_equals_the_in_loop_trace(loaded, stream, tmp_path):
    cfg = replace(BASE, policy=PolicyConfig(warmup="pcw"), trace=True)
    a = run(replace(cfg, trace_path=str(tmp_path / "a.parquet")), loaded)
    b = replay(stream, replace(cfg, trace_path=str(tmp_path / "b.parquet")))
    pd.testing.assert_frame_equal(
        pd.read_parquet(a["trace_path"]), pd.read_parquet(b["trace_path"])
    )


def test_replayed_lru_hits_iff_the_stack_distance_fits(loaded, tmp_path):
    """Whole high-bit experts, one size: LRU with room for n hits exactly the requests whose
    key was used before with fewer than n other keys since."""
    cfg = replace(
        BASE,
        policy=PolicyConfig(precision="high", warmup="lru"),
        cache=CacheConfig(frac=0.1),
        trace=True,
        trace_path=str(tmp_path / "t.parquet"),
    )
    t = pd.read_parquet(replay(record(cfg, loaded), cfg)["trace_path"])
    room = capacity_bytes(cfg, read_shape(None)) // int(t.bytes.iloc[0])
    assert set(t.slice) == {"FULL"} and 10 < room < 256
    checked = 0
    for _, seq in t.groupby("sequence", sort=False):
        last: dict = {}
        keys = list(zip(seq.layer, seq.expert))
        for i, (key, hit) in enumerate(zip(keys, seq.hit)):
            if key in last:
                distance = len(set(keys[last[key] + 1 : i]))
                assert hit == (distance < room), (i, key, distance, room)
                checked += 1
            else:
                assert not hit
            last[key] = i
    assert checked > 1000


def test_stream_round_trips_through_a_file(stream, tmp_path):
    back = Stream.load(stream.save(tmp_path / "requests.npz"))
    assert back.key == stream.key and back.scores == stream.scores
    assert back.shape == stream.shape and back.dims == stream.dims
    for name in ("prompt_len", "prefill_counts", "decode_steps", "experts", "high"):
        assert np.array_equal(getattr(back, name), getattr(stream, name)), name
    cfg = replace(BASE, cache=CacheConfig(frac=0.1))
    assert replay(back, cfg)["miss_rate"] == replay(stream, cfg)["miss_rate"]


def test_a_stream_exported_as_a_trace_and_imported_replays_identically(stream, tmp_path):
    """record -> `python -m slicemoe.traces export` -> import_trace -> replay: every metric and
    curve of the recorded stream, prefetching by the next-gate ranking with DBSC's critical
    slices and PCW's prefill counts included."""
    requests = stream.save(tmp_path / "requests.npz")
    assert traces.main(["export", str(requests), str(tmp_path / "t.npz")]) == 0
    cfg = replace(
        BASE,
        cache=CacheConfig(frac=0.15),
        policy=replace(BASE.policy, warmup="pcw"),
        prefetch=PrefetchConfig(name="ng", predictor="next_gate", top_m=6, slices="critical"),
    )
    imported = replace(cfg, stream_file=str(tmp_path / "t.npz"))
    a, b = replay(stream, cfg), run(imported)
    assert math.isnan(b.pop("batch_rows")) and a.pop("batch_rows") == 2
    assert set(a) == set(b)
    for name in set(a) - {"wall_s"}:
        assert repr(a[name]) == repr(b[name]), name  # exact, NaN included
    assert b["prefetch_recall"] > 0  # the ranking came through


def test_what_may_and_may_not_replay(stream):
    assert replayable(BASE)
    for policy in (
        PolicyConfig(routing="cache_prior", lam=0.2),
        PolicyConfig(on_miss="skip_lsb"),
        PolicyConfig(on_miss="substitute"),
        PolicyConfig(routing="cache_prior", miss_rate_target=0.05),
    ):
        # Its requests depend on the cache: it replays its own pass, not the top-k one.
        cfg = replace(BASE, policy=policy)
        assert replayable(cfg) and stream_key(cfg) != stream.key
        with pytest.raises(ValueError, match="in cache or policy"):
            replay(stream, cfg)
    deep = replace(BASE, prefetch=PrefetchConfig(name="ng", predictor="next_gate", top_m=17))
    drop = replace(BASE, policy=PolicyConfig(on_miss="drop"))  # what it drops reads gate weights
    for cfg, why in ((deep, "prefetch.top_m=17"), (drop, "policy.on_miss=drop")):
        assert not replayable(cfg)
        with pytest.raises(ValueError, match=why):
            replay(stream, cfg)
    # Cache, warmup, window and hardware do not change the stream; bits, tau and the task do.
    same_stream = [
        replace(BASE, cache=CacheConfig(frac=0.5, eviction="belady")),
        replace(BASE, policy=replace(BASE.policy, warmup="pcw", warmup_steps=3)),
        replace(BASE, hardware=HardwareConfig(name="x", flash_gbps=1.0)),
    ]
    assert {stream_key(c) for c in same_stream} == {stream.key}
    for other in (
        replace(BASE, bits=BITS["mat42"]),
        replace(BASE, policy=replace(BASE.policy, tau=0.3)),
        replace(BASE, eval=replace(BASE.eval, limit=5)),
    ):
        assert stream_key(other) != stream.key
        with pytest.raises(ValueError, match="stream key"):
            replay(stream, other)


@pytest.mark.parametrize("eviction", ["arc", "slru", "s3fifo", "lrfu", "lecar", "least_stale"])
def test_each_policy_replays_compiled_as_the_reference_and_as_the_model_in_the_loop(
    stream, eviction, tmp_path
):
    """Without a trace the replay runs slicemoe.cache.compiled, with one the reference cache;
    in the loop every row's cache is the reference, seeded as the replay's."""
    cfg = replace(BASE, cache=CacheConfig(frac=0.1, eviction=eviction))
    fast = replay(stream, cfg)
    slow = replay(stream, replace(cfg, trace=True, trace_path=str(tmp_path / "t.parquet")))
    loop = run(cfg)
    for m in METRICS:
        if m not in ("wall_s", "trace_path"):
            assert same(fast[m], slow[m]), (m, fast[m], slow[m])
            assert same(fast[m], loop[m]), (m, fast[m], loop[m])
    assert 0 < fast["miss_rate"] < 1


CACHE_AWARE = {
    "cache_prior_running_target_substitute": PolicyConfig(
        routing="cache_prior",
        lam=0.1,
        lam_scale="running",
        miss_rate_target=0.05,
        warmup_steps=3,
        on_miss="substitute",
    ),
    "cumsum": PolicyConfig(routing="cumsum", precision="high", cumsum_p=0.8),
    "dbsc_skip": PolicyConfig(on_miss="skip_lsb", warmup="pcw"),
}


CACHE_AWARE_RUN = replace(
    BASE, policy=CACHE_AWARE["cache_prior_running_target_substitute"], cache=CacheConfig(frac=0.1)
)


@pytest.mark.parametrize("name", sorted(CACHE_AWARE))
def test_a_cache_aware_pass_replays_as_the_model_in_the_loop_under_another_hardware(loaded, name):
    """The requests of a cache-aware run depend on its cache and policy, not on the hardware
    that bills them: its pass, recorded under one profile (with a prefetcher where it changes
    the cache), replays exactly as the model in the loop under the other."""
    mobile, laptop = (PROFILES[n] for n in sorted(PROFILES, reverse=True))
    prefetch = PrefetchConfig(name="p", predictor="prev_token") if name == "cumsum" else None
    cfg = replace(
        BASE,
        policy=CACHE_AWARE[name],
        cache=CacheConfig(frac=0.1),
        hardware=mobile,
        prefetch=prefetch or PrefetchConfig(),
    )
    stream = record(cfg, loaded)
    other = replace(cfg, hardware=replace(laptop, overlap_flash=True))
    assert stream_key(other) == stream.key
    expected, got = run(other, loaded), replay(stream, other)
    for m in METRICS:
        if m != "wall_s":
            assert same(expected[m], got[m]), (name, m, expected[m], got[m])
    assert expected["problems"] == got["problems"]
    assert expected["energy_decode_j_per_token"] != replay(stream, cfg)["energy_decode_j_per_token"]
    # Its miss-ratio curve would replay requests another cache size would not have made.
    assert miss_ratio_curve(stream, cfg, [0.2, 0.5]) == []


def test_configs_packed_into_one_pass_record_what_each_records_alone(loaded):
    """Configs sharing one model pass, each its own rows of every batch (on the device runtime,
    as on a GPU): two cache-aware ones at other cache sizes, one with a prefetcher. Each stream
    is the one its config records alone, so its replays equal its solo in-loop runs (above)."""
    small = dict(
        model=replace(BASE.model, backend="tensor"), eval=EvalConfig(limit=2, max_new_tokens=12)
    )
    cfgs = [
        replace(CACHE_AWARE_RUN, **small),
        replace(
            BASE,
            **small,
            policy=CACHE_AWARE["cumsum"],
            cache=CacheConfig(frac=0.3),
            prefetch=PrefetchConfig(name="p", predictor="prev_token"),
        ),
    ]
    packed = record_packed(cfgs, loaded)
    for cfg, got in zip(cfgs, packed):
        want = record(cfg, loaded)
        assert got.key == want.key
        for name in ("prompt_len", "prefill_counts", "decode_steps", "experts", "high",
                     "next_gate", "next_gate_critical"):  # fmt: skip
            assert np.array_equal(getattr(got, name), getattr(want, name)), (cfg.policy, name)
        assert got.scores == want.scores
    with pytest.raises(ValueError, match="share eval"):
        record_packed([BASE, replace(BASE, eval=replace(BASE.eval, limit=1))], loaded)
