"""A compiled replay of the slice cache (the eviction policies in EVICTIONS).

`reference.SliceCache` is the readable definition: Python dicts and OrderedDicts, about a
million requests a second. Replaying a real model's stream (tens of millions of slice requests
per cache size) needs more, so this module runs the same rules in a numba-compiled loop over
arrays. Every ordered set of a policy (LRU order, ARC's T1/T2/B1/B2, S3-FIFO's queues, LeCaR's
histories, least-stale's layers) is a doubly linked list over key ids with a sentinel, oldest
first; a key is in at most one list (`where`), each list knows its bytes. Policies that order
by a number (LRFU, LeCaR's LFU expert) keep a lazy heap per pool. It starts from a
`SliceCache`'s state (so prefill and warmup keep their one Python definition) and returns the
hit of every request (tests/test_cache_conformance.py compares them request by request).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from slicemoe.cache.reference import KIND_CODE, KINDS, MASK64, SliceCache

EVICTIONS = ("lru", "fifo", "arc", "slru", "s3fifo", "lrfu", "lecar", "least_stale")
LRU, FIFO, ARC, SLRU, S3FIFO, LRFU, LECAR, STALE = range(len(EVICTIONS))
# Per-pool scalars: ints [clock, draws, flag (ARC's ghost hit, S3-FIFO's from-ghost), S3-FIFO
# has evicted], floats [ARC's p, LeCaR's w_lru].
CLOCK, DRAWS, FLAG, EVICTED = range(4)
P, W_LRU = range(2)
# Numbers of the policy's parameters: [S3-FIFO small bytes, S3-FIFO main bytes, SLRU protected
# bytes, LRFU lambda, LeCaR learning rate, LeCaR discount, LeCaR history bytes].
SMALL, MAIN, LIMIT, LAM, RATE, DISCOUNT, HISTORY = range(7)


def key_ids(layers, experts, kinds, num_experts: int) -> np.ndarray:
    """Dense ids of (layer, expert, kind code) keys."""
    return (np.asarray(layers) * num_experts + np.asarray(experts)) * len(KINDS) + np.asarray(kinds)


# --- lists: list j's sentinel is slot n_keys + j -----------------------------------------------


@numba.njit(cache=True)
def _push(prev, nxt, where, lbytes, n_keys, j, k, size, oldest=False):
    head = n_keys + j
    if oldest:
        first = nxt[head]
        prev[first] = k
        nxt[k] = first
        prev[k] = head
        nxt[head] = k
    else:
        last = prev[head]
        nxt[last] = k
        prev[k] = last
        nxt[k] = head
        prev[head] = k
    where[k] = j
    lbytes[j] += size


@numba.njit(cache=True)
def _pop(prev, nxt, where, lbytes, k, size):
    nxt[prev[k]] = nxt[k]
    prev[nxt[k]] = prev[k]
    lbytes[where[k]] -= size
    where[k] = -1


@numba.njit(cache=True)
def _first(nxt, n_keys, j):
    """The oldest key of list j, or -1 when it is empty."""
    k = nxt[n_keys + j]
    return -1 if k >= n_keys else k


# --- lazy heaps of (priority, stamp, key), one per pool -----------------------------------------


@numba.njit(cache=True)
def _less(hp, ht, q, a, b):
    return hp[q, a] < hp[q, b] or (hp[q, a] == hp[q, b] and ht[q, a] < ht[q, b])


@numba.njit(cache=True)
def _swap(hp, ht, hk, q, a, b):
    hp[q, a], hp[q, b] = hp[q, b], hp[q, a]
    ht[q, a], ht[q, b] = ht[q, b], ht[q, a]
    hk[q, a], hk[q, b] = hk[q, b], hk[q, a]


@numba.njit(cache=True)
def _sift_down(hp, ht, hk, hn, q, i):
    while True:
        c = 2 * i + 1
        if c >= hn[q]:
            return
        if c + 1 < hn[q] and _less(hp, ht, q, c + 1, c):
            c += 1
        if not _less(hp, ht, q, c, i):
            return
        _swap(hp, ht, hk, q, i, c)
        i = c


@numba.njit(cache=True)
def _heap_push(hp, ht, hk, hn, q, prio, stamp, k):
    i = hn[q]
    hp[q, i], ht[q, i], hk[q, i] = prio, stamp, k
    hn[q] += 1
    while i > 0 and _less(hp, ht, q, i, (i - 1) // 2):
        _swap(hp, ht, hk, q, i, (i - 1) // 2)
        i = (i - 1) // 2


@numba.njit(cache=True)
def _heap_pop(hp, ht, hk, hn, q):
    hn[q] -= 1
    _swap(hp, ht, hk, q, 0, hn[q])
    _sift_down(hp, ht, hk, hn, q, 0)


@numba.njit(cache=True)
def _live_min(hp, ht, hk, hn, where, kstamp, n_keys, q, j):
    """The key of pool q's smallest live entry: its key is in list j with the entry's stamp."""
    while True:
        k = hk[q, 0]
        if where[k] == j and kstamp[k] == ht[q, 0]:
            return k
        _heap_pop(hp, ht, hk, hn, q)


@numba.njit(cache=True)
def _heap_add(hp, ht, hk, hn, where, kstamp, kprio, n_keys, q, j, k):
    """Push k's entry; when the heap is full, rebuild it from the live keys (list j) first."""
    if hn[q] == hp.shape[1]:
        hn[q] = 0
        for x in range(n_keys):
            if where[x] == j and x != k:
                hp[q, hn[q]], ht[q, hn[q]], hk[q, hn[q]] = kprio[x], kstamp[x], x
                hn[q] += 1
        for i in range(hn[q] // 2 - 1, -1, -1):
            _sift_down(hp, ht, hk, hn, q, i)
    _heap_push(hp, ht, hk, hn, q, kprio[k], kstamp[k], k)


@numba.njit(cache=True)
def _uniform(seed, n):
    """reference.uniform: the n-th draw of the SplitMix64 stream `seed`."""
    z = seed + np.uint64(n + 1) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * 2.0**-53


# --- the replay ----------------------------------------------------------------------------------


@numba.njit(cache=True)
def _run(requests, sizes, capacity, used, in_cache, resident, marks, policy, lpp, n_experts,
         prev, nxt, where, lbytes, kfreq, kstamp, kprio, kcrf, klast, ist, fst, par, seeds,
         hp, ht, hk, hn):  # fmt: skip
    """Replay `requests` (key ids); returns hits and the resident-expert count after each
    request index in `marks`. Keys: (layer * E + expert) * 3 + kind; pool q (0: MSB/FULL,
    1: LSB) owns lists q * lpp .. q * lpp + lpp - 1."""
    n_keys = in_cache.shape[0]
    hits = np.zeros(requests.shape[0], dtype=np.bool_)
    counts = np.zeros(marks.shape[0], dtype=np.int64)
    n_pool = np.zeros(2, dtype=np.int64)
    for k in range(n_keys):
        if in_cache[k]:
            n_pool[1 if k % 3 == 1 else 0] += 1
    n_resident = 0
    for i in range(resident.shape[0]):
        n_resident += resident[i]
    m = 0
    for i in range(requests.shape[0]):
        k = requests[i]
        q = 1 if k % 3 == 1 else 0
        b = q * lpp
        size = sizes[k % 3]
        if in_cache[k]:  # --- touch
            hits[i] = True
            ist[q, CLOCK] += 1
            if policy == LRU or (policy == ARC and where[k] == b + 1):
                _pop(prev, nxt, where, lbytes, k, size)
                _push(prev, nxt, where, lbytes, n_keys, b + int(policy == ARC), k, size)
            elif policy == ARC:  # T1 -> T2
                _pop(prev, nxt, where, lbytes, k, size)
                _push(prev, nxt, where, lbytes, n_keys, b + 1, k, size)
            elif policy == SLRU:
                if where[k] == b:
                    _pop(prev, nxt, where, lbytes, k, size)
                    _push(prev, nxt, where, lbytes, n_keys, b + 1, k, size)
                    while lbytes[b + 1] > par[LIMIT]:
                        v = _first(nxt, n_keys, b + 1)
                        _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                        _push(prev, nxt, where, lbytes, n_keys, b, v, sizes[v % 3])
                else:
                    _pop(prev, nxt, where, lbytes, k, size)
                    _push(prev, nxt, where, lbytes, n_keys, b + 1, k, size)
            elif policy == S3FIFO:
                kfreq[k] = min(kfreq[k] + 1, 3)
            elif policy == LRFU:
                decay = 2.0 ** (-par[LAM] * float(ist[q, CLOCK] - klast[k]))
                kcrf[k] = 1.0 + kcrf[k] * decay
                klast[k] = kstamp[k] = ist[q, CLOCK]
                kprio[k] = math.log2(kcrf[k]) + par[LAM] * float(ist[q, CLOCK])
                _heap_add(hp, ht, hk, hn, where, kstamp, kprio, n_keys, q, b, k)
            elif policy == LECAR:
                _pop(prev, nxt, where, lbytes, k, size)
                _push(prev, nxt, where, lbytes, n_keys, b, k, size)
                kfreq[k] += 1
                kstamp[k] = ist[q, CLOCK]
                kprio[k] = float(kfreq[k])
                _heap_add(hp, ht, hk, hn, where, kstamp, kprio, n_keys, q, b, k)
            elif policy == STALE:
                j = where[k]
                _pop(prev, nxt, where, lbytes, k, size)
                _push(prev, nxt, where, lbytes, n_keys, j, k, size)
                kstamp[k] = ist[q, CLOCK]
        else:
            # --- admit: what the policy remembers of k
            ist[q, FLAG] = 0
            if policy == ARC and (where[k] == b + 2 or where[k] == b + 3):
                b1, b2 = float(lbytes[b + 2]), float(lbytes[b + 3])
                if where[k] == b + 2:
                    fst[q, P] = min(fst[q, P] + max(b2 / b1, 1.0) * size, float(capacity))
                    ist[q, FLAG] = 1
                else:
                    fst[q, P] = max(fst[q, P] - max(b1 / b2, 1.0) * size, 0.0)
                    ist[q, FLAG] = 2
                _pop(prev, nxt, where, lbytes, k, size)
            elif policy == S3FIFO and where[k] == b + 2:
                _pop(prev, nxt, where, lbytes, k, size)
                ist[q, FLAG] = 1
            elif policy == LECAR and (where[k] == b + 1 or where[k] == b + 2):
                t = float(ist[q, CLOCK] - kstamp[k])
                regret = math.exp(-par[RATE] * par[DISCOUNT] ** t)
                w_lru, w_lfu = fst[q, W_LRU], 1.0 - fst[q, W_LRU]
                if where[k] == b + 1:
                    w_lru *= regret
                else:
                    w_lfu *= regret
                fst[q, W_LRU] = w_lru / (w_lru + w_lfu)
                _pop(prev, nxt, where, lbytes, k, size)
            # --- evict while there is no room
            while used + size > capacity:
                e = 1 if n_pool[1] > 0 else 0
                eb = e * lpp
                v = -1
                if policy == LRU or policy == FIFO:
                    v = _first(nxt, n_keys, eb)
                    _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                elif policy == ARC:
                    replace = ist[e, FLAG] != 0
                    if not replace:
                        if lbytes[eb] + lbytes[eb + 2] + size > capacity:
                            if _first(nxt, n_keys, eb + 2) < 0:  # T1 alone: unremembered
                                v = _first(nxt, n_keys, eb)
                                _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                            else:
                                g = _first(nxt, n_keys, eb + 2)
                                _pop(prev, nxt, where, lbytes, g, sizes[g % 3])
                        elif (
                            lbytes[eb] + lbytes[eb + 1] + lbytes[eb + 2] + lbytes[eb + 3]
                            >= (2 * capacity)
                            and _first(nxt, n_keys, eb + 3) >= 0
                        ):
                            g = _first(nxt, n_keys, eb + 3)
                            _pop(prev, nxt, where, lbytes, g, sizes[g % 3])
                    if v < 0:
                        t1 = float(lbytes[eb])
                        p = fst[e, P]
                        if (
                            _first(nxt, n_keys, eb) >= 0
                            and (t1 > p or (t1 == p and ist[e, FLAG] == 2))
                        ) or _first(nxt, n_keys, eb + 1) < 0:
                            v = _first(nxt, n_keys, eb)
                            _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                            _push(prev, nxt, where, lbytes, n_keys, eb + 2, v, sizes[v % 3])
                        else:
                            v = _first(nxt, n_keys, eb + 1)
                            _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                            _push(prev, nxt, where, lbytes, n_keys, eb + 3, v, sizes[v % 3])
                elif policy == SLRU:
                    v = _first(nxt, n_keys, eb)
                    if v < 0:
                        v = _first(nxt, n_keys, eb + 1)
                    _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                elif policy == S3FIFO:
                    ist[e, EVICTED] = 1
                    while v < 0:
                        if lbytes[eb + 1] > par[MAIN] or _first(nxt, n_keys, eb) < 0:
                            while v < 0:
                                x = _first(nxt, n_keys, eb + 1)
                                _pop(prev, nxt, where, lbytes, x, sizes[x % 3])
                                if kfreq[x] == 0:
                                    v = x
                                else:
                                    kfreq[x] -= 1
                                    _push(prev, nxt, where, lbytes, n_keys, eb + 1, x, sizes[x % 3])
                        else:
                            while v < 0 and _first(nxt, n_keys, eb) >= 0:
                                x = _first(nxt, n_keys, eb)
                                _pop(prev, nxt, where, lbytes, x, sizes[x % 3])
                                if kfreq[x] >= 2:
                                    kfreq[x] = 0
                                    _push(prev, nxt, where, lbytes, n_keys, eb + 1, x, sizes[x % 3])
                                else:
                                    v = x
                                    _push(prev, nxt, where, lbytes, n_keys, eb + 2, x, sizes[x % 3])
                                    while lbytes[eb + 2] > par[MAIN]:
                                        g = _first(nxt, n_keys, eb + 2)
                                        _pop(prev, nxt, where, lbytes, g, sizes[g % 3])
                elif policy == LRFU:
                    v = _live_min(hp, ht, hk, hn, where, kstamp, n_keys, e, eb)
                    _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                elif policy == LECAR:
                    v = _first(nxt, n_keys, eb)
                    by_lfu = _live_min(hp, ht, hk, hn, where, kstamp, n_keys, e, eb)
                    expert = -1
                    if by_lfu != v:
                        expert = 0 if _uniform(seeds[e], ist[e, DRAWS]) < fst[e, W_LRU] else 1
                        ist[e, DRAWS] += 1
                        if expert == 1:
                            v = by_lfu
                    _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                    if expert >= 0:
                        _push(prev, nxt, where, lbytes, n_keys, eb + 1 + expert, v, sizes[v % 3])
                        kstamp[v] = ist[e, CLOCK]
                        while lbytes[eb + 1 + expert] > par[HISTORY]:
                            g = _first(nxt, n_keys, eb + 1 + expert)
                            _pop(prev, nxt, where, lbytes, g, sizes[g % 3])
                elif policy == STALE:
                    best, fallback = -1, -1
                    for la in range(resident.shape[0] // n_experts):
                        x = _first(nxt, n_keys, eb + la)
                        if x < 0:
                            continue
                        if la < k // 3 // n_experts and (best < 0 or kstamp[x] < kstamp[best]):
                            best = x
                        if fallback < 0 or kstamp[x] < kstamp[fallback]:
                            fallback = x
                    v = best if best >= 0 else fallback
                    _pop(prev, nxt, where, lbytes, v, sizes[v % 3])
                in_cache[v] = False
                n_pool[e] -= 1
                used -= sizes[v % 3]
                if v % 3 != 1:
                    base = v - v % 3
                    now = in_cache[base] or in_cache[base + 2]
                    if resident[v // 3] and not now:
                        n_resident -= 1
                    resident[v // 3] = now
            # --- add
            ist[q, CLOCK] += 1
            if policy == ARC:
                _push(prev, nxt, where, lbytes, n_keys, b + int(ist[q, FLAG] != 0), k, size)
            elif policy == S3FIFO:
                main = ist[q, FLAG] != 0 or (ist[q, EVICTED] == 0 and lbytes[b] >= par[SMALL])
                _push(prev, nxt, where, lbytes, n_keys, b + int(main), k, size)
                kfreq[k] = 0
            elif policy == STALE:
                _push(prev, nxt, where, lbytes, n_keys, b + k // 3 // n_experts, k, size)
                kstamp[k] = ist[q, CLOCK]
            else:
                _push(prev, nxt, where, lbytes, n_keys, b, k, size)
            if policy == LRFU:
                kcrf[k] = 1.0
                klast[k] = kstamp[k] = ist[q, CLOCK]
                kprio[k] = 0.0 + par[LAM] * float(ist[q, CLOCK])
                _heap_add(hp, ht, hk, hn, where, kstamp, kprio, n_keys, q, b, k)
            elif policy == LECAR:
                kfreq[k] = 1
                kstamp[k] = ist[q, CLOCK]
                kprio[k] = 1.0
                _heap_add(hp, ht, hk, hn, where, kstamp, kprio, n_keys, q, b, k)
            ist[q, FLAG] = 0
            in_cache[k] = True
            n_pool[q] += 1
            used += size
            if k % 3 != 1 and not resident[k // 3]:
                resident[k // 3] = True
                n_resident += 1
        while m < marks.shape[0] and marks[m] == i:
            counts[m] = n_resident
            m += 1
    return hits, counts


class _Arrays:
    """The array form of a SliceCache's two pools, filled from its policy objects."""

    def __init__(self, cache: SliceCache, eviction: str):
        layers, experts = cache.resident.shape
        self.experts = experts
        self.n_keys = n_keys = layers * experts * len(KINDS)
        self.lpp = max(4, layers)
        n_lists = 2 * self.lpp
        self.prev = np.empty(n_keys + n_lists, dtype=np.int64)
        self.nxt = np.empty(n_keys + n_lists, dtype=np.int64)
        for j in range(n_lists):
            self.prev[n_keys + j] = self.nxt[n_keys + j] = n_keys + j
        self.where = np.full(n_keys, -1, dtype=np.int64)
        self.lbytes = np.zeros(n_lists, dtype=np.int64)
        self.kfreq = np.zeros(n_keys, dtype=np.int64)
        self.kstamp = np.zeros(n_keys, dtype=np.int64)
        self.klast = np.zeros(n_keys, dtype=np.int64)
        self.kprio = np.zeros(n_keys, dtype=np.float64)
        self.kcrf = np.zeros(n_keys, dtype=np.float64)
        self.ist = np.zeros((2, 4), dtype=np.int64)
        self.fst = np.zeros((2, 2), dtype=np.float64)
        self.seeds = np.zeros(2, dtype=np.uint64)
        size = 4 * n_keys + 64
        self.hp = np.zeros((2, size), dtype=np.float64)
        self.ht = np.zeros((2, size), dtype=np.int64)
        self.hk = np.zeros((2, size), dtype=np.int64)
        self.hn = np.zeros(2, dtype=np.int64)
        self.sizes = cache.sizes
        for q, pool in enumerate((cache.main, cache.low)):
            budget = getattr(pool, "budget", None)  # the policies that draw keep theirs
            self.seeds[q] = np.uint64(budget.seed & MASK64 if budget else 0)
            getattr(self, f"_{eviction}")(q, q * self.lpp, pool)

    def id(self, key) -> int:
        return int(key_ids(key[0], key[1], KIND_CODE[key[2]], self.experts))

    def fill(self, j: int, keys) -> None:
        for key in keys:  # oldest first
            k = self.id(key)
            _push(self.prev, self.nxt, self.where, self.lbytes, self.n_keys, j, k,
                  self.sizes[key[2]])  # fmt: skip

    def heap(self, q: int, pool, prio) -> None:
        for key, stamp in pool.stamp.items():
            k = self.id(key)
            self.kstamp[k], self.kprio[k] = stamp, prio(key)
            _heap_push(self.hp, self.ht, self.hk, self.hn, q, self.kprio[k], stamp, k)

    def _lru(self, q, b, pool):
        self.fill(b, pool.order)

    _fifo = _lru

    def _arc(self, q, b, pool):
        for j, part in enumerate((pool.t1, pool.t2, pool.b1, pool.b2)):
            self.fill(b + j, part.keys)
        self.fst[q, P] = pool.p

    def _slru(self, q, b, pool):
        self.fill(b, pool.probation.keys)
        self.fill(b + 1, pool.protected.keys)

    def _s3fifo(self, q, b, pool):
        for j, part in enumerate((pool.s, pool.m, pool.g)):
            self.fill(b + j, part.keys)
        for key, f in pool.freq.items():
            self.kfreq[self.id(key)] = f
        self.ist[q, EVICTED] = pool.evicted

    def _lrfu(self, q, b, pool):
        self.fill(b, pool.crf)
        for key in pool.crf:
            k = self.id(key)
            self.kcrf[k], self.klast[k] = pool.crf[key], pool.last[key]
        self.heap(q, pool, lambda key: _lrfu_prio(pool, key))
        self.ist[q, CLOCK] = pool.clock

    def _lecar(self, q, b, pool):
        self.fill(b, pool.lru.order)
        for expert, history in enumerate(pool.history):
            self.fill(b + 1 + expert, history.keys)
            for key in history.keys:
                self.kstamp[self.id(key)] = pool.evicted_at[key]
        for key, count in pool.count.items():
            self.kfreq[self.id(key)] = count
        self.heap(q, pool, lambda key: float(pool.count[key]))
        self.ist[q, CLOCK], self.ist[q, DRAWS] = pool.clock, pool.draws
        self.fst[q, W_LRU] = pool.w_lru

    def _least_stale(self, q, b, pool):
        for layer, order in pool.layers.items():
            self.fill(b + layer, order)
            for key, stamp in order.items():
                self.kstamp[self.id(key)] = stamp
        self.ist[q, CLOCK] = pool.clock


def _lrfu_prio(pool, key) -> float:
    """reference.LRFU's heap priority of a resident key, as it pushed it."""
    if pool.stamp[key] < 0:
        return -math.inf
    return math.log2(pool.crf[key]) + pool.lam * pool.last[key]


def _params(cache: SliceCache) -> np.ndarray:
    par = np.zeros(7)
    pool = cache.main
    if hasattr(pool, "small_cap"):
        par[SMALL], par[MAIN] = pool.small_cap, pool.main_cap
    if hasattr(pool, "limit"):
        par[LIMIT] = pool.limit
    if hasattr(pool, "lam"):
        par[LAM] = pool.lam
    if hasattr(pool, "learning_rate"):
        par[RATE], par[DISCOUNT] = pool.learning_rate, pool.discount
        par[HISTORY] = cache.capacity // 2
    return par


def replay_requests(cache: SliceCache, requests: np.ndarray, marks: np.ndarray, eviction: str):
    """Continue `cache` (as left by prefill and warmup) with `requests` (key ids, every miss
    fetched). Returns (hit per request, resident experts after each request index in `marks`).
    `cache` itself is not changed."""
    if eviction not in EVICTIONS:
        raise ValueError(f"the compiled replay serves {EVICTIONS}, not {eviction!r}")
    a = _Arrays(cache, eviction)
    in_cache = np.zeros(a.n_keys, dtype=np.bool_)
    for key in cache.entries:
        in_cache[a.id(key)] = True
    return _run(
        np.ascontiguousarray(requests, dtype=np.int64),
        np.array([cache.sizes.get(k, 0) for k in KINDS], dtype=np.int64),
        int(cache.capacity),
        int(cache.used),
        in_cache,
        cache.resident.ravel().copy(),
        np.ascontiguousarray(marks, dtype=np.int64),
        EVICTIONS.index(eviction),
        a.lpp,
        cache.resident.shape[1],
        a.prev, a.nxt, a.where, a.lbytes, a.kfreq, a.kstamp, a.kprio, a.kcrf, a.klast,
        a.ist, a.fst, _params(cache), a.seeds, a.hp, a.ht, a.hk, a.hn,
    )  # fmt: skip
