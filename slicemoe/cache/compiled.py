"""A compiled replay of the slice cache for LRU and FIFO eviction (the common case).

`reference.SliceCache` is the readable definition: a Python dict and OrderedDicts, about a
million requests a second. Replaying a real model's stream (tens of millions of slice requests
per cache size) needs more, so this module runs the same rules in a numba-compiled loop over
arrays: each pool (MSB/FULL, and the low-priority LSB pool) is a doubly linked list with a
sentinel, least recently used first. It starts from a `SliceCache`'s state (so prefill and
warmup keep their one Python definition) and returns the hit of every request
(tests/test_cache_conformance.py compares them request by request).
"""

from __future__ import annotations

import numba
import numpy as np

from slicemoe.cache.reference import KIND_CODE, KINDS, SliceCache

EVICTIONS = ("lru", "fifo")


def key_ids(layers, experts, kinds, num_experts: int) -> np.ndarray:
    """Dense ids of (layer, expert, kind code) keys."""
    return (np.asarray(layers) * num_experts + np.asarray(experts)) * len(KINDS) + np.asarray(kinds)


@numba.njit(cache=True)
def _unlink(prev, nxt, k):
    nxt[prev[k]] = nxt[k]
    prev[nxt[k]] = prev[k]


@numba.njit(cache=True)
def _append(prev, nxt, head, k):
    last = prev[head]
    nxt[last] = k
    prev[k] = last
    nxt[k] = head
    prev[head] = k


@numba.njit(cache=True)
def _run(requests, sizes, capacity, used, in_cache, prev, nxt, resident, touch, marks):
    """Replay `requests` (key ids); returns hits and the resident-expert count after each
    request index in `marks`. Keys: (layer * E + expert) * 3 + kind; the two sentinels are the
    last two list slots (main pool, then LSB pool)."""
    n_keys = in_cache.shape[0]
    head_main, head_low = n_keys, n_keys + 1
    hits = np.zeros(requests.shape[0], dtype=np.bool_)
    counts = np.zeros(marks.shape[0], dtype=np.int64)
    n_resident = 0
    for i in range(resident.shape[0]):
        n_resident += resident[i]
    m = 0
    for i in range(requests.shape[0]):
        k = requests[i]
        kind = k % 3
        head = head_low if kind == 1 else head_main
        if in_cache[k]:
            hits[i] = True
            if touch:
                _unlink(prev, nxt, k)
                _append(prev, nxt, head, k)
        else:
            size = sizes[kind]
            while used + size > capacity:
                victim = nxt[head_low]
                if victim == head_low:
                    victim = nxt[head_main]
                _unlink(prev, nxt, victim)
                in_cache[victim] = False
                used -= sizes[victim % 3]
                if victim % 3 != 1:
                    base = victim - victim % 3
                    now = in_cache[base] or in_cache[base + 2]
                    if resident[victim // 3] and not now:
                        n_resident -= 1
                    resident[victim // 3] = now
            in_cache[k] = True
            used += size
            _append(prev, nxt, head, k)
            if kind != 1 and not resident[k // 3]:
                resident[k // 3] = True
                n_resident += 1
        while m < marks.shape[0] and marks[m] == i:
            counts[m] = n_resident
            m += 1
    return hits, counts


def replay_requests(cache: SliceCache, requests: np.ndarray, marks: np.ndarray, eviction: str):
    """Continue `cache` (LRU or FIFO, as left by prefill and warmup) with `requests` (key ids,
    every miss fetched). Returns (hit per request, resident experts after each request index in
    `marks`). `cache` itself is not changed."""
    if eviction not in EVICTIONS:
        raise ValueError(f"the compiled replay serves {EVICTIONS}, not {eviction!r}")
    layers, experts = cache.resident.shape
    n_keys = layers * experts * len(KINDS)
    prev = np.empty(n_keys + 2, dtype=np.int64)
    nxt = np.empty(n_keys + 2, dtype=np.int64)
    for head in (n_keys, n_keys + 1):
        prev[head] = nxt[head] = head
    in_cache = np.zeros(n_keys, dtype=np.bool_)
    for pool, head in ((cache.main, n_keys), (cache.low, n_keys + 1)):
        for key in pool.order:  # least recently used first
            k = int(key_ids(key[0], key[1], KIND_CODE[key[2]], experts))
            in_cache[k] = True
            last = prev[head]
            nxt[last], prev[k], nxt[k], prev[head] = k, last, head, k
    sizes = np.array([cache.sizes.get(k, 0) for k in KINDS], dtype=np.int64)
    return _run(
        np.ascontiguousarray(requests, dtype=np.int64),
        sizes,
        int(cache.capacity),
        int(cache.used),
        in_cache,
        prev,
        nxt,
        cache.resident.ravel().copy(),
        eviction == "lru",
        np.ascontiguousarray(marks, dtype=np.int64),
    )
