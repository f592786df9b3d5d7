"""How far a replayed run's eviction is from the optimum, and what in the requests decides it.

`optimality(stream, cfg)` sets a replayable run beside Belady's oracle at the same DRAM bytes
and describes the decode requests:
- **Belady's miss rate** (`belady_miss_rate`): one more replay of the stream with
  `cache.eviction=belady`, whose MSB/FULL pool evicts the slice requested again furthest in the
  future (slicemoe.cache.reference.Belady). `belady_gap` is the run's decode slice miss rate
  minus it, over all decode steps. For slices of one size (whole experts) and warmup `lru` or
  `empty`, no demand eviction misses less (prefill's requests, which Belady sees too, are all
  first requests), so the gap is >= 0; with bit slices, LSB slices in a pool of their own and
  the two copies of `bits.scheme=base`, Belady is the classic rule, not a proven bound. A run whose warmup inserts slices (`random`, `pcw`) or that
  prefetches is set beside Belady from the cache prefill left (`warmup=lru`, no prefetching),
  what demand eviction alone reaches: there the gap may be negative, what the warmup or the
  prefetcher buys beyond it.
- **Per layer** (table `optimality_layers`): decode requests, the run's and Belady's miss rate
  and the gap (the run's is NaN when it prefetches), and the expert popularity: the entropy of
  the layer's decode expert-use distribution over log(experts), 1 when every expert is used
  equally often, log(k)/log(experts) at the least (the same k experts at every token).
- **Reuse distances** (table `reuse_distance`): per layer, for every decode expert call, the
  number of distinct other experts that layer called since this expert's previous call in the
  same sequence (-1: its first call in the sequence, a cold call); calls within a step count in
  their recorded order, the order the cache sees them. A cache holding C experts of one layer
  in LRU order hits exactly the calls at distances below C.
- **The cold-start window** (`cold_start_steps`, defined there): the decode steps until the
  run's per-step miss rate has come down to the level that follows.

Belady's replay depends on the stream, the DRAM bytes and the warmup only, and the stream's
statistics on the stream only: a `shared` dict kept across the runs of one stream computes each
once (a sweep's runs that differ only in eviction share them). The run itself is replayed once
more, for the hits of its requests.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from slicemoe.config import PrefetchConfig, RunConfig
from slicemoe.replay import replay
from slicemoe.stream import Stream, cache_independent
from slicemoe.validate import capacity_bytes

# The cold-start window's constants (see `cold_start_steps`).
STRETCH = 4  # decode steps pooled per rate: one step of one device is a few dozen requests
TOLERANCE = 0.1  # above the level that follows, relative ...
FLOOR = 0.005  # ... and at least this much absolute, for miss rates near zero


def belady_config(cfg: RunConfig) -> RunConfig:
    """`cfg` with Belady's eviction; a warmup that inserts (which Belady's future cannot see,
    slicemoe.validate) becomes lru, and prefetching goes."""
    warmup = "lru" if cfg.policy.warmup in ("random", "pcw") else cfg.policy.warmup
    return dataclasses.replace(
        cfg,
        cache=dataclasses.replace(cfg.cache, eviction="belady"),
        policy=dataclasses.replace(cfg.policy, warmup=warmup),
        prefetch=PrefetchConfig(),
        trace=False,
        trace_path=None,
    )


def optimality(stream: Stream, cfg: RunConfig, shared: dict | None = None):
    """({"belady_miss_rate", "belady_gap", "cold_start_steps"}, {"optimality_layers": table,
    "reuse_distance": table}) of `cfg` replayed from `stream`; `shared` keeps what runs of the
    stream have in common (module doc). Nothing for a config whose requests depend on its cache
    (cache-aware routing, misses not fetched)."""
    if not cache_independent(cfg):
        # Belady's replay needs requests no cache decided (slicemoe.validate); these were.
        return {}, {}
    shared = {} if shared is None else shared
    layers = stream.shape.num_moe_layers
    oracle = belady_config(cfg)
    key = ("belady", stream.key, capacity_bytes(cfg, stream.shape), oracle.policy.warmup)
    if key not in shared:
        shared[key] = _served(stream, oracle)
    bound = shared[key]
    run = _served(stream, cfg)
    if ("stream", stream.key) not in shared:
        shared["stream", stream.key] = (popularity_entropy(stream), reuse_distances(stream))
    entropy, reuse = shared["stream", stream.key]
    # Per-step requests do not depend on the cache: Belady's are the run's (it prefetches or not).
    requests = bound["step_requests"]
    misses = np.nan_to_num(np.asarray(run["result"]["curves"]["miss_rate_step"]) * requests)
    scalars = {
        "belady_miss_rate": bound["result"]["miss_rate"],
        "belady_gap": run["result"]["miss_rate"] - bound["result"]["miss_rate"],
        "cold_start_steps": float(cold_start_steps(misses, requests)),
    }
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = run["layer_misses"] / bound["layer_requests"]
        best = bound["layer_misses"] / bound["layer_requests"]
    table = pd.DataFrame({
        "layer": np.arange(layers),
        "requests": bound["layer_requests"],
        "miss_rate": rate,
        "belady_miss_rate": best,
        "belady_gap": rate - best,
        "expert_entropy": entropy,
    })  # fmt: skip
    at = np.nonzero(reuse)
    distances = pd.DataFrame({
        "layer": at[0],
        "distance": np.where(at[1] == stream.shape.num_experts, -1, at[1]),
        "calls": reuse[at],
    }).sort_values(["layer", "distance"], ignore_index=True)  # fmt: skip
    return scalars, {"optimality_layers": table, "reuse_distance": distances}


def _served(stream: Stream, cfg: RunConfig) -> dict:
    """The replay of `cfg` and its decode requests and misses per step and per layer (layer
    misses NaN when it prefetches: its replay does not hand out requests)."""
    served: list = []
    result = replay(stream, dataclasses.replace(cfg, trace=False, trace_path=None), served)
    layers = stream.shape.num_moe_layers
    steps = len(result["curves"]["miss_rate_step"])
    out = {
        "result": result,
        "step_requests": np.zeros(steps),
        "layer_requests": np.zeros(layers),
        "layer_misses": np.zeros(layers) if served else np.full(layers, math.nan),
    }
    for step, layer, _, _, hits in served:
        out["step_requests"] += np.bincount(step, minlength=steps)
        out["layer_requests"] += np.bincount(layer, minlength=layers)
        out["layer_misses"] += np.bincount(layer[~hits], minlength=layers)
    return out


def popularity_entropy(stream: Stream) -> np.ndarray:
    """Per MoE layer, the entropy of its decode expert-use distribution / log(experts)."""
    experts = stream.shape.num_experts
    counts = np.stack([
        np.bincount(stream.experts[:, layer].ravel(), minlength=experts)
        for layer in range(stream.shape.num_moe_layers)
    ]).astype(float)  # fmt: skip
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / counts.sum(1, keepdims=True)
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return h / math.log(experts)


def reuse_distances(stream: Stream) -> np.ndarray:
    """[layers, experts + 1] decode expert calls by reuse distance (module doc): column d the
    calls at distance d, the last column the cold calls."""
    layers, experts = stream.shape.num_moe_layers, stream.shape.num_experts
    hist = np.zeros((layers, experts + 1), dtype=np.int64)
    rows = np.arange(layers)
    for s in range(stream.num_sequences):
        chosen = stream.sequence(s)[2]  # [steps, layers, k]
        last = np.full((layers, experts), -1)  # each expert's latest call (a count of calls)
        clock = 0
        # Every layer at once, one call position at a time: a layer's calls are its own stream.
        for calls in chosen.transpose(0, 2, 1).reshape(-1, layers):
            seen = last[rows, calls]
            distance = np.where(seen < 0, experts, (last > seen[:, None]).sum(1))
            hist[rows, distance] += 1
            last[rows, calls] = clock
            clock += 1
    return hist


def cold_start_steps(
    misses, requests, stretch: int = STRETCH, tolerance: float = TOLERANCE, floor: float = FLOOR
) -> int:
    """The cold-start window of per-decode-step misses and requests (summed over devices): the
    first decode step u whose stretch's miss rate is at most the level that follows it plus
    max(tolerance x level, floor); 0 when the run starts settled.

    A stretch is `stretch` consecutive steps from u, its rate their pooled misses over their
    pooled requests; the level that follows u is the median rate of the stretches from u on.
    The median, not a mean over the last steps, because a task's requests drift (the answer of
    a problem is not its reasoning) and a batch's last steps have few devices: a cold cache
    shows as stretches above all that follows, whatever the level does later. One-sided, as a
    cold cache only adds misses."""
    misses, requests = np.asarray(misses, float), np.asarray(requests, float)
    if len(misses) < stretch:
        return 0
    m, r = (np.concatenate([[0.0], np.cumsum(x)]) for x in (misses, requests))
    rate = (m[stretch:] - m[:-stretch]) / (r[stretch:] - r[:-stretch])
    level = np.array([np.median(rate[u:]) for u in range(len(rate))])
    # The last stretch is its own level: some stretch always qualifies.
    return int(np.argmax(rate <= level + np.maximum(tolerance * level, floor)))
