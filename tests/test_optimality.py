"""slicemoe.optimality: a replayed run beside Belady's oracle, and the statistics of its stream."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from slicemoe.cache import EVICTION
from slicemoe.config import BitsConfig, CacheConfig, PolicyConfig, PrefetchConfig, RunConfig
from slicemoe.models import Dims, Shape
from slicemoe.optimality import (
    belady_config,
    cold_start_steps,
    optimality,
    popularity_entropy,
    reuse_distances,
)
from slicemoe.replay import replay
from slicemoe.stream import Stream, stream_key

TINY = Shape(num_moe_layers=8, num_experts=32, top_k=4, hidden=128, moe_intermediate=64)


def stream_of(cfg: RunConfig, experts, shape: Shape = TINY, steps=None, seed: int = 0) -> Stream:
    """A stream for `cfg` whose decode calls are `experts` [steps, layers, k] (sequences of
    `steps` each), a quarter of them critical, with random prefill counts."""
    rng = np.random.default_rng(seed)
    experts = np.asarray(experts, dtype=np.int16)
    steps = np.asarray(steps if steps is not None else [len(experts)], dtype=np.int32)
    n, layers, depth = len(steps), experts.shape[1], min(16, shape.num_experts)
    return Stream(
        key=stream_key(cfg),
        config={},
        shape=shape,
        dims=Dims(dense_params=1e5, head_params=128_000, kv_values=256, attn_dim=128),
        scores={"accuracy": [1.0] * n},
        prompt_len=np.full(n, 12, np.int32),
        prefill_counts=rng.integers(0, 3, (n, layers, shape.num_experts)).astype(np.int32),
        decode_steps=steps,
        experts=experts,
        high=rng.random(experts.shape) < 0.25,
        next_gate=np.zeros((len(experts), layers, depth), np.int16),
        next_gate_critical=np.zeros(experts.shape, bool),
    )


def routed(rng, steps: int, shape: Shape = TINY) -> np.ndarray:
    """Top-k picks of skewed (Zipf-like) popularity, a different ranking per layer."""
    e, k = shape.num_experts, shape.top_k
    weights = 1.0 / np.arange(1, e + 1)
    ranks = [rng.permutation(e) for _ in range(shape.num_moe_layers)]
    return np.array([
        [rank[rng.choice(e, k, replace=False, p=weights / weights.sum())] for rank in ranks]
        for _ in range(steps)
    ])  # fmt: skip


@pytest.fixture(scope="module")
def runs():
    """DBSC (MSB and LSB slices) and whole 8-bit experts (slices of one size), each with its
    synthetic stream of 3 sequences."""
    rng = np.random.default_rng(7)
    base = RunConfig(batch_size=1)
    whole = replace(base, bits=BitsConfig(name="int8", high=8, low=None),
                    policy=PolicyConfig(precision="high"))  # fmt: skip
    experts = routed(rng, 90)
    return [(cfg, stream_of(cfg, experts, steps=[30, 30, 30])) for cfg in (base, whole)]


def test_no_eviction_misses_less_than_belady_and_belady_has_no_gap(runs):
    for cfg, stream in runs:
        shared: dict = {}
        for frac in (0.1, 0.25):
            for eviction in sorted(EVICTION):
                c = replace(cfg, cache=CacheConfig(frac=frac, eviction=eviction))
                scalars, _ = optimality(stream, c, shared)
                assert scalars["belady_gap"] >= 0, (cfg.bits.name, frac, eviction, scalars)
                if eviction == "belady":
                    assert scalars["belady_gap"] == 0
                else:
                    assert scalars["belady_gap"] > 0 or frac == 0.25, (frac, eviction)
        # One Belady replay per cache size, shared by every eviction; the stream's statistics once.
        assert sorted(k[0] for k in shared) == ["belady", "belady", "stream"]


def test_per_layer_values_add_up_to_the_replay(runs):
    cfg, stream = runs[0]
    cfg = replace(cfg, cache=CacheConfig(frac=0.1, eviction="lru"))
    scalars, tables = optimality(stream, cfg)
    layers = tables["optimality_layers"]
    result = replay(stream, cfg)
    requests = layers["requests"].sum()
    assert math.isclose((layers["miss_rate"] * layers["requests"]).sum() / requests,
                        result["miss_rate"])  # fmt: skip
    assert math.isclose(scalars["belady_gap"], result["miss_rate"] - scalars["belady_miss_rate"])
    assert (layers["belady_gap"] >= -1e-12).all() and len(layers) == TINY.num_moe_layers
    # Every decode expert call has one reuse distance, and the first call in a sequence is cold.
    reuse = tables["reuse_distance"]
    assert reuse["calls"].sum() == stream.experts.size
    assert reuse[reuse["distance"] == -1]["calls"].sum() >= TINY.top_k * 3


def test_a_prefetching_or_inserting_run_is_set_beside_belady_on_demand_from_prefill(runs):
    cfg, stream = runs[0]
    cfg = replace(
        cfg,
        cache=CacheConfig(frac=0.1, eviction="lfu"),
        policy=replace(cfg.policy, warmup="pcw"),
        prefetch=PrefetchConfig(name="prev_token", predictor="prev_token"),
    )
    oracle = belady_config(cfg)
    assert (oracle.cache.eviction, oracle.policy.warmup, oracle.prefetch) == (
        "belady", "lru", PrefetchConfig()
    )  # fmt: skip
    scalars, tables = optimality(stream, cfg)
    assert math.isclose(scalars["belady_gap"] + scalars["belady_miss_rate"],
                        replay(stream, cfg)["miss_rate"])  # fmt: skip
    # A prefetching replay hands out no requests: no per-layer miss rate of its own.
    assert tables["optimality_layers"]["miss_rate"].isna().all()


def test_reuse_distances_and_popularity_entropy_on_a_hand_made_stream():
    shape = Shape(num_moe_layers=2, num_experts=4, top_k=2, hidden=8, moe_intermediate=8)
    # Sequence 0: three steps; sequence 1: one step (its calls are cold again).
    experts = [[[0, 1], [3, 2]], [[1, 2], [3, 2]], [[0, 1], [2, 3]], [[0, 1], [2, 3]]]
    stream = stream_of(RunConfig(), experts, shape, steps=[3, 1])
    hist = reuse_distances(stream)
    # Layer 0 calls 0 1 | 1 2 | 0 1: cold, cold, 0, cold, 2 ({1, 2}), 2 ({2, 0}); then 2 cold.
    # Layer 1 calls 3 2 | 3 2 | 2 3: cold, cold, 1, 1, 0, 1; then 2 cold.
    assert hist.tolist() == [[1, 0, 2, 0, 5], [1, 3, 0, 0, 4]]
    counts = np.array([3, 4, 1])  # layer 0: experts 0, 1, 2 (3 is never used)
    p = counts / counts.sum()
    golden = -(p * np.log(p)).sum() / math.log(4)
    assert np.allclose(popularity_entropy(stream), [golden, 0.5])  # layer 1: 2 and 3 alike


def test_cold_start_window_on_a_synthetic_sequence():
    requests = np.full(40, 100.0)
    settle = np.array([90, 60, 40, 25] + [20, 20, 21, 19] * 9, float)
    # Stretches of 4 from step u: 0.5375, 0.3625, 0.2625, 0.215, then 0.2 on; the level after
    # u = 3 is 0.2, the band 0.2 + 10 % = 0.22.
    assert cold_start_steps(settle, requests) == 3
    assert cold_start_steps(settle, requests, tolerance=0.5) == 2  # 0.2625 <= 0.3
    # Settled from the start: a later rise (requests that drift) is not a cold start.
    assert cold_start_steps(np.r_[np.full(20, 5.0), np.full(20, 30.0)], requests) == 0
    # Near zero the absolute floor decides (0.5 % above the level).
    assert cold_start_steps(np.r_[[2.0, 1.0], np.zeros(38)], requests, stretch=1) == 2
    assert cold_start_steps(np.r_[[0.4, 0.4], np.zeros(38)], requests, stretch=1) == 0
    assert cold_start_steps([9.0, 1.0], [10.0, 10.0]) == 0  # shorter than a stretch
