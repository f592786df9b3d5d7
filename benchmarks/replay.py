"""Replay a synthetic decode routing trace through the slice cache and libCacheSim's LRU.

The trace has the shape of Qwen1.5-MoE-A2.7B decode (24 MoE layers, 60 experts, top-4): per
layer a Zipf-skewed expert popularity, and temporal correlation (with probability `--reuse` a
token keeps the previous token's expert for a slot). Three caches see the same request sequence
of equal-sized whole experts: the reference `SliceCache` (Python), the compiled replay that
`slicemoe.replay` uses for LRU/FIFO (`slicemoe.cache.compiled`) and libCacheSim's LRU (C). Their
hit sequences must agree; the benchmark checks that and prints requests/s of each and the ratios,
measured in the same process (the compiled replay after one warm-up call that compiles it).

    python benchmarks/replay.py                 # 100k tokens (9.6M requests)
    python benchmarks/replay.py --tokens 5000   # a quick look

Then a whole run's replay at that shape (`slicemoe.replay.replay`: prefill, PCW warmup, decode
with MAT84 DBSC slices, per-step counters and the hardware bill) of a synthetic request stream of
`--sequences` devices that decode the same trace in turns, cut into 200-token sequences with
512-token prompts: the cost of replaying one cache configuration of a GSM8K-sized sweep.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from slicemoe.cache import KIND_CODE, SliceCache
from slicemoe.cache.compiled import key_ids, replay_requests


def synthetic_trace(tokens, layers=24, experts=60, k=4, zipf=1.1, reuse=0.6, seed=0):
    """Expert ids [tokens, layers, k], distinct within a (token, layer)."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, experts + 1)
    logp = np.log(ranks**-zipf / np.sum(ranks**-zipf))
    # Each layer has its own popularity order.
    logp = np.stack([logp[rng.permutation(experts)] for _ in range(layers)])
    out = np.empty((tokens, layers, k), dtype=np.int64)
    prev = None
    for t in range(tokens):
        # Gumbel top-k draws k distinct experts per layer from the Zipf distribution.
        fresh = np.argsort(-(logp + rng.gumbel(size=logp.shape)), axis=1)[:, :k]
        if prev is not None:
            keep = rng.random((layers, k)) < reuse
            cand = np.where(keep, prev, fresh)
            # A kept expert may collide with a fresh one; fall back to the fresh set there.
            dup = np.array([len(set(row)) < k for row in cand])
            cand[dup] = fresh[dup]
            fresh = cand
        out[t] = prev = fresh
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--frac", type=float, default=0.25, help="cache capacity / all experts")
    ap.add_argument("--sequences", type=int, default=1319, help="devices of the whole-run replay")
    args = ap.parse_args()
    layers, experts = 24, 60
    t0 = time.perf_counter()
    trace = synthetic_trace(args.tokens, layers, experts)
    n_req = trace.size
    print(f"trace: {args.tokens:,} tokens -> {n_req:,} requests ({time.perf_counter() - t0:.1f} s)")
    capacity = int(args.frac * layers * experts)
    layer_ids = np.broadcast_to(np.arange(layers)[None, :, None], trace.shape).ravel().tolist()
    expert_ids = trace.ravel().tolist()

    cache = SliceCache(capacity, {"FULL": 1}, layers, experts, "lru")
    t0 = time.perf_counter()
    ours = [cache.request((la, e, "FULL")) for la, e in zip(layer_ids, expert_ids)]
    t_ours = time.perf_counter() - t0

    empty = SliceCache(capacity, {"FULL": 1}, layers, experts, "lru")
    ids = key_ids(np.asarray(layer_ids), np.asarray(expert_ids), KIND_CODE["FULL"], experts)
    replay_requests(empty, ids[:1000], np.array([0]), "lru")  # compile
    t0 = time.perf_counter()
    fast, _ = replay_requests(empty, ids, np.array([0]), "lru")
    t_fast = time.perf_counter() - t0

    import libcachesim as lcs

    ref = lcs.LRU(cache_size=capacity)
    req = lcs.Request()
    req.obj_size = 1
    theirs = []
    t0 = time.perf_counter()
    for la, e in zip(layer_ids, expert_ids):
        req.obj_id = la * experts + e
        theirs.append(ref.get(req))
    t_lcs = time.perf_counter() - t0

    agree = ours == [bool(h) for h in theirs] == fast.tolist()
    miss = 1 - sum(ours) / n_req
    print(f"capacity {capacity} experts ({args.frac:.0%}), LRU miss rate {miss:.4f}")
    print(f"hit sequences identical (all three): {agree}")
    print(f"slicemoe SliceCache (reference) : {n_req / t_ours:,.0f} requests/s ({t_ours:.2f} s)")
    print(f"slicemoe compiled replay        : {n_req / t_fast:,.0f} requests/s ({t_fast:.2f} s)")
    print(f"libCacheSim LRU                 : {n_req / t_lcs:,.0f} requests/s ({t_lcs:.2f} s)")
    print(f"ratio SliceCache / libCacheSim: {t_lcs / t_ours:.2f}x throughput")
    print(f"ratio compiled / libCacheSim  : {t_lcs / t_fast:.2f}x throughput")
    if not agree:
        raise SystemExit("hit sequences differ")
    whole_run(trace, args.sequences)


def whole_run(trace: np.ndarray, sequences: int, steps: int = 200, prompt: int = 512):
    """Time `replay` on a Qwen1.5-MoE-shaped stream built from the synthetic trace."""
    import json
    import tempfile
    from pathlib import Path

    from slicemoe.config import CacheConfig, ModelConfig, PolicyConfig, RunConfig
    from slicemoe.models import Dims, Shape
    from slicemoe.replay import replay
    from slicemoe.stream import Stream, stream_key

    shape = Shape(24, 60, 4, 2048, 1408)
    rng = np.random.default_rng(1)
    n = sequences * steps
    experts = np.resize(trace, (n, *trace.shape[1:])).astype(np.int16)
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "model_type": "qwen2_moe", "num_hidden_layers": 24, "num_experts": 60,
            "num_experts_per_tok": 4, "hidden_size": 2048, "moe_intermediate_size": 1408,
        }  # fmt: skip
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        cfg = RunConfig(
            model=ModelConfig(name="qwen-shape", path=tmp),
            cache=CacheConfig(frac=0.25),
            policy=PolicyConfig(precision="dbsc", warmup="pcw"),
        )
        stream = Stream(
            key=stream_key(cfg),
            config={},
            shape=shape,
            dims=Dims(dense_params=50_000_000, head_params=151_936 * 2048, kv_values=4096,
                      attn_dim=2048),
            scores={"accuracy": [0] * sequences},
            prompt_len=np.full(sequences, prompt, dtype=np.int32),
            prefill_counts=rng.poisson(30, (sequences, 24, 60)).astype(np.int32),
            decode_steps=np.full(sequences, steps, dtype=np.int32),
            experts=experts,
            high=rng.random(experts.shape) < 0.07,
            next_gate=np.full((n, 24, 16), -1, dtype=np.int16),  # read only when prefetching
            next_gate_critical=np.zeros(experts.shape, dtype=bool),
        )  # fmt: skip
        replay_requests(SliceCache(1, {"FULL": 1}, 1, 1), np.array([2]), np.array([0]), "lru")
        t0 = time.perf_counter()
        r = replay(stream, cfg)
        dt = time.perf_counter() - t0
    calls = experts.size
    req = calls + int(stream.high.sum())  # an MSB per call, an LSB per high-bit call
    print(
        f"whole-run replay: {sequences} sequences x {steps} steps, {req:,} decode slice requests"
        f" + prefill; miss rate {r['miss_rate']:.4f}; {dt:.2f} s = {req / dt:,.0f} requests/s"
    )


if __name__ == "__main__":
    main()
