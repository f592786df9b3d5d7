"""Replay a synthetic decode routing trace through the slice cache and libCacheSim's LRU.

The trace has the shape of Qwen1.5-MoE-A2.7B decode (24 MoE layers, 60 experts, top-4): per
layer a Zipf-skewed expert popularity, and temporal correlation (with probability `--reuse` a
token keeps the previous token's expert for a slot). Three caches see the same request sequence
of equal-sized whole experts: the reference `SliceCache` (Python), the compiled replay that
`slicemoe.replay` uses for LRU/FIFO (`slicemoe.fastcache`) and libCacheSim's LRU (C). Their hit
sequences must agree; the benchmark checks that and prints requests/s of each and the ratios,
measured in the same process (the compiled replay after one warm-up call that compiles it).

    python benchmarks/replay.py                 # 100k tokens (9.6M requests)
    python benchmarks/replay.py --tokens 5000   # a quick look
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from slicemoe.cache import SliceCache
from slicemoe.fastcache import KIND_CODE, key_ids, replay_requests


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


if __name__ == "__main__":
    main()
