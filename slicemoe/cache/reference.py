"""The slice cache: expert slices in DRAM, the rest in Flash (DESIGN.md section 4).

One cache is shared by all layers. Entries are keyed (layer, expert, kind) with kind MSB, LSB
or FULL (FULL: a whole expert of a non-sliced configuration). Capacity is in bytes. LSB entries
live in a pool of their own that is always emptied before any MSB/FULL entry is evicted: the
LSB slice of a critical expert rarely comes back soon, so it must not push out MSB slices.
Within each pool an eviction policy, chosen by name, picks the victim.

This is the readable definition of the cache; the package's other implementations (compiled,
tensor, kernel) follow it, and tests/test_cache_conformance.py holds them to it.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = ("MSB", "LSB", "FULL")
KIND_CODE = {k: i for i, k in enumerate(KINDS)}  # MSB 0, LSB 1, FULL 2 (array form)
Key = tuple  # (layer, expert, kind)


# --- eviction policies ---------------------------------------------------------------------
#
# A policy orders one pool's entries for eviction. For each slice that enters, the cache calls
# admit(key), then evict(key) as often as it needs room (each call picks a victim, forgets it as
# resident and returns it; `key` is the slice entering, of this pool or the other), then add(key)
# or add_cold(key) (a prefetch entering at the evict-first end). touch(key) is each later use of
# a resident slice; remove(key) is the owner evicting a slice itself (a warmup's choice), which
# leaves no history. Policies with parameters name the cache.* config fields that set them in
# CONFIG (keyword argument -> field); their defaults live in slicemoe.config alone.


@dataclass(frozen=True)
class Budget:
    """What a policy knows of its cache: the capacity in bytes (the most its pool may hold, as
    the other pool may be empty), the bytes of a slice of each kind, and the seed of any
    random choice."""

    capacity: int
    sizes: dict
    seed: int = 0

    def size(self, key) -> int:
        return self.sizes[key[2]]

    @property
    def slots(self) -> int:
        """The most slices the cache can hold (of its smallest kind)."""
        return max(1, self.capacity // min(v for v in self.sizes.values() if v > 0))


class Policy:
    CONFIG: dict[str, str] = {}

    def admit(self, key):
        pass


class Queue:
    """Keys in order, oldest first, with their total bytes (a building block of policies)."""

    def __init__(self, budget: Budget):
        self.keys: OrderedDict[Hashable, None] = OrderedDict()
        self.bytes = 0
        self.budget = budget

    def push(self, key, oldest: bool = False):
        self.keys[key] = None
        self.keys.move_to_end(key, last=not oldest)
        self.bytes += self.budget.size(key)

    def pop(self, key=None):
        """Take out `key`, or the oldest key."""
        if key is None:
            key = next(iter(self.keys))
        del self.keys[key]
        self.bytes -= self.budget.size(key)
        return key

    def __contains__(self, key):
        return key in self.keys

    def __len__(self):
        return len(self.keys)


class LRU(Policy):
    def __init__(self, budget: Budget):
        self.order: OrderedDict[Hashable, None] = OrderedDict()

    def add(self, key):
        self.order[key] = None

    def add_cold(self, key):
        """Enter at the evict-first end (a prefetch inserted as least recently used)."""
        self.order[key] = None
        self.order.move_to_end(key, last=False)

    def touch(self, key):
        self.order.move_to_end(key)

    def remove(self, key):
        del self.order[key]

    def evict(self, incoming):
        return self.order.popitem(last=False)[0]

    def __len__(self):
        return len(self.order)


class FIFO(LRU):
    def touch(self, key):
        pass


class LFU(Policy):
    """Least frequently used since insertion; ties go to the least recently used."""

    def __init__(self, budget: Budget):
        self.count: dict[Hashable, int] = {}
        self.stamp: dict[Hashable, int] = {}  # clock of each key's live heap entry
        self.heap: list = []
        self.clock = 0

    def _push(self, key):
        self.clock += 1
        self.stamp[key] = self.clock
        heapq.heappush(self.heap, (self.count[key], self.clock, key))

    def add(self, key):
        self.count[key] = 1
        self._push(key)

    def add_cold(self, key):
        """Never used yet: below every entry that was, and the next victim among those."""
        self.count[key] = 0
        self.clock += 1
        self.stamp[key] = -self.clock
        heapq.heappush(self.heap, (0, -self.clock, key))

    def touch(self, key):
        self.count[key] += 1
        self._push(key)

    def remove(self, key):
        del self.count[key]
        del self.stamp[key]

    def evict(self, incoming):
        # Entries of keys touched, removed or re-inserted since they were pushed are stale; the
        # stamp (not the count) tells them apart, so a re-inserted key is as recent as it is.
        key = _live_min(self.heap, self.stamp)
        self.remove(key)
        return key

    def __len__(self):
        return len(self.count)


def _live_min(heap: list, stamp: dict):
    """The key of the smallest live entry of a lazy heap of (priority, stamp, key): live while
    the key's current stamp is the entry's."""
    while True:
        _, s, key = heap[0]
        if stamp.get(key) == s:
            return key
        heapq.heappop(heap)


class Belady(Policy):
    """Evicts the entry whose next request is furthest away (optimal; an oracle bound).

    It is given the whole future request sequence and counts requests itself: the cache calls
    exactly one of add/touch per request, so the n-th call is request n.
    """

    def __init__(self, budget: Budget, future: Sequence[Hashable]):
        self.future = list(future)
        nxt = [len(self.future)] * len(self.future)
        seen: dict[Hashable, int] = {}
        for i in range(len(self.future) - 1, -1, -1):
            nxt[i] = seen.get(self.future[i], len(self.future) + i)
            seen[self.future[i]] = i
        self.next_use = nxt
        self.t = 0
        self.when: dict[Hashable, int] = {}
        self.heap: list = []

    def _advance(self, key):
        if self.t >= len(self.future) or self.future[self.t] != key:
            raise RuntimeError(
                f"Belady was given a future that diverges from the requests at {self.t}: "
                "replay exactly the recorded sequence"
            )
        self.when[key] = self.next_use[self.t]
        heapq.heappush(self.heap, (-self.when[key], key))
        self.t += 1

    add = touch = _advance

    def remove(self, key):
        del self.when[key]

    def evict(self, incoming):
        while True:
            neg, key = self.heap[0]
            if self.when.get(key) == -neg:
                break
            heapq.heappop(self.heap)
        self.remove(key)
        return key

    def __len__(self):
        return len(self.when)


class ARC(Policy):
    """Adaptive Replacement Cache (Megiddo & Modha, FAST'03), in bytes.

    T1 holds slices used once since they entered, T2 slices used again (each LRU, oldest
    first); B1 and B2 remember what T1 and T2 evicted (ghosts: keys, no data). `p`, the bytes
    T1 aims for, grows on a hit in B1 (T1 was too small) and shrinks on a hit in B2, by the
    entering slice's bytes times the ghosts' size ratio (at least 1), within [0, capacity]; a
    victim comes from T1 when T1 holds more than p, else from T2. The directory (T1+B1, and
    all four lists) is trimmed to the capacity (twice it) only when a victim is needed, as
    libCacheSim does for objects of variable size. A slice entering from a ghost list goes to
    T2; a cold insert goes to T1's oldest end.
    """

    def __init__(self, budget: Budget):
        self.budget = budget
        self.t1, self.t2, self.b1, self.b2 = (Queue(budget) for _ in range(4))
        self.p = 0.0
        self.ghost_hit = 0  # 1 or 2: the slice entering now was in B1 or B2

    def admit(self, key):
        self.ghost_hit = 0
        size, c = self.budget.size(key), self.budget.capacity
        if key in self.b1:
            self.p = min(self.p + max(self.b2.bytes / self.b1.bytes, 1) * size, c)
            self.b1.pop(key)
            self.ghost_hit = 1
        elif key in self.b2:
            self.p = max(self.p - max(self.b1.bytes / self.b2.bytes, 1) * size, 0.0)
            self.b2.pop(key)
            self.ghost_hit = 2

    def _replace(self):
        t1 = self.t1.bytes
        if (t1 and (t1 > self.p or (t1 == self.p and self.ghost_hit == 2))) or not self.t2:
            key = self.t1.pop()
            self.b1.push(key)
        else:
            key = self.t2.pop()
            self.b2.push(key)
        return key

    def evict(self, incoming):
        if self.ghost_hit:
            return self._replace()
        c = self.budget.capacity
        if self.t1.bytes + self.b1.bytes + self.budget.size(incoming) > c:
            if not self.b1:  # T1 alone fills the directory: its oldest goes, unremembered
                return self.t1.pop()
            self.b1.pop()
        elif self.t1.bytes + self.t2.bytes + self.b1.bytes + self.b2.bytes >= 2 * c and self.b2:
            self.b2.pop()
        return self._replace()

    def add(self, key):
        (self.t2 if self.ghost_hit else self.t1).push(key)
        self.ghost_hit = 0

    def add_cold(self, key):
        self.t1.push(key, oldest=True)
        self.ghost_hit = 0

    def touch(self, key):
        if key in self.t1:
            self.t1.pop(key)
        else:
            self.t2.pop(key)
        self.t2.push(key)

    def remove(self, key):
        (self.t1 if key in self.t1 else self.t2).pop(key)

    def __len__(self):
        return len(self.t1) + len(self.t2)


class SLRU(Policy):
    """Segmented LRU (Karedla et al. 1994): a probationary and a protected segment, each LRU.

    A slice enters probation; used again, it moves to the protected segment, whose bytes are
    at most `protected` x capacity (cache.slru_protected, 0.8 by default): past that, the
    protected segment's oldest slice goes back to probation's newest end. Victims come from
    probation, from the protected segment only when probation is empty.
    """

    CONFIG = {"protected": "slru_protected"}

    def __init__(self, budget: Budget, protected: float):
        self.limit = protected * budget.capacity
        self.probation, self.protected = Queue(budget), Queue(budget)

    def add(self, key):
        self.probation.push(key)

    def add_cold(self, key):
        self.probation.push(key, oldest=True)

    def touch(self, key):
        if key in self.probation:
            self.probation.pop(key)
            self.protected.push(key)
            while self.protected.bytes > self.limit:
                self.probation.push(self.protected.pop())
        else:
            self.protected.pop(key)
            self.protected.push(key)

    def evict(self, incoming):
        return (self.probation if self.probation else self.protected).pop()

    def remove(self, key):
        (self.probation if key in self.probation else self.protected).pop(key)

    def __len__(self):
        return len(self.probation) + len(self.protected)


class S3FIFO(Policy):
    """S3-FIFO (Yang et al., SOSP'23): a small FIFO S (`small` x capacity, cache.s3fifo_small,
    0.1 by default), a main FIFO M (the rest) and a ghost FIFO G of keys (as many bytes as M).

    Each use adds 1 to a slice's counter, capped at 3. A slice enters S, or M when G remembers
    it. A victim comes from M while M holds more than its share or S is empty, else from S.
    S's oldest slice moves to M (counter reset) if used at least twice while in S (the paper's
    Algorithm 1 and libCacheSim's default), else it is the victim and G remembers it. M's
    oldest slice is the victim if unused, else it goes back to M's newest end, its counter
    less one. As in libCacheSim, a slice moved from S to M does not itself evict from M, and
    until the pool first evicts, slices enter M once S holds its share.
    """

    CONFIG = {"small": "s3fifo_small"}

    def __init__(self, budget: Budget, small: float):
        self.small_cap = int(budget.capacity * small)  # libCacheSim's rounding
        self.main_cap = budget.capacity - self.small_cap
        self.s, self.m, self.g = Queue(budget), Queue(budget), Queue(budget)
        self.freq: dict[Hashable, int] = {}
        self.from_ghost = False
        self.evicted = False  # whether the pool has evicted yet

    def admit(self, key):
        self.from_ghost = key in self.g
        if self.from_ghost:
            self.g.pop(key)

    def add(self, key, oldest: bool = False):
        # Until its first eviction the pool fills M once S has its share (as libCacheSim does).
        to_main = self.from_ghost or (not self.evicted and self.s.bytes >= self.small_cap)
        (self.m if to_main else self.s).push(key, oldest)
        self.freq[key] = 0
        self.from_ghost = False

    def add_cold(self, key):
        self.add(key, oldest=True)

    def touch(self, key):
        self.freq[key] = min(self.freq[key] + 1, 3)

    def _evict_small(self):
        while self.s:
            key = self.s.pop()
            if self.freq[key] >= 2:
                self.freq[key] = 0
                self.m.push(key)
                continue
            del self.freq[key]
            self.g.push(key)
            while self.g.bytes > self.main_cap:
                self.g.pop()
            return key
        return None

    def _evict_main(self):
        while True:
            key = self.m.pop()
            if self.freq[key] == 0:
                del self.freq[key]
                return key
            self.freq[key] -= 1
            self.m.push(key)

    def evict(self, incoming):
        self.evicted = True
        while True:
            if self.m.bytes > self.main_cap or not self.s:
                return self._evict_main()
            key = self._evict_small()  # None when all of S moved to M
            if key is not None:
                return key

    def remove(self, key):
        (self.s if key in self.s else self.m).pop(key)
        del self.freq[key]

    def __len__(self):
        return len(self.s) + len(self.m)


class LRFU(Policy):
    """LRFU (Lee et al., IEEE ToC 2001): the victim has the smallest combined recency and
    frequency CRF = sum over its uses of (1/2)^(lambda x age), ages counted in this pool's
    uses; lambda = cache.lrfu_lambda in [0, 1]: 0 is LFU (ties to the least recently used),
    1 is LRU. All CRFs decay alike, so their order is kept by log2(CRF at the last use) +
    lambda x (time of the last use) in a heap. A cold insert has CRF 0: below every entry
    that was used, the latest cold one first (as LFU's and LRU's)."""

    CONFIG = {"lam": "lrfu_lambda"}

    def __init__(self, budget: Budget, lam: float):
        self.lam = lam
        self.crf: dict[Hashable, float] = {}
        self.last: dict[Hashable, int] = {}
        self.stamp: dict[Hashable, int] = {}
        self.heap: list = []
        self.clock = 0

    def _use(self, key, crf: float, cold: bool = False):
        self.clock += 1
        self.crf[key], self.last[key] = crf, self.clock
        self.stamp[key] = -self.clock if cold else self.clock
        prio = -math.inf if cold else math.log2(crf) + self.lam * self.clock
        heapq.heappush(self.heap, (prio, self.stamp[key], key))

    def add(self, key):
        self._use(key, 1.0)

    def add_cold(self, key):
        self._use(key, 0.0, cold=True)

    def touch(self, key):
        decay = 2.0 ** (-self.lam * (self.clock + 1 - self.last[key]))
        self._use(key, 1.0 + self.crf[key] * decay)

    def remove(self, key):
        del self.crf[key], self.last[key], self.stamp[key]

    def evict(self, incoming):
        key = _live_min(self.heap, self.stamp)
        self.remove(key)
        return key

    def __len__(self):
        return len(self.crf)


class LeCaR(Policy):
    """LeCaR (Vietri et al., HotStorage'18): two experts, LRU and LFU (ties to the least
    recently used; counts start at 1 on entry), and the weight w_lru of LRU's choice.

    When the experts disagree, the victim is LRU's with probability w_lru (draws seeded from
    the cache's seed), and goes to that expert's history (a FIFO of keys, half the capacity in
    bytes, as in libCacheSim); when they agree it is remembered by neither. A slice entering
    from an expert's history was a mistake of that expert: its weight is multiplied by
    exp(-learning_rate x d^t), t the uses since that eviction, d = 0.005^(1/N) for a cache of
    N slices (the paper's discount), and both weights renormalised. learning_rate =
    cache.lecar_learning_rate (0.45, the paper's, by default).
    """

    CONFIG = {"learning_rate": "lecar_learning_rate"}

    def __init__(self, budget: Budget, learning_rate: float):
        self.budget, self.learning_rate = budget, learning_rate
        self.discount = 0.005 ** (1 / budget.slots)
        self.lru = LRU(budget)
        self.count: dict[Hashable, int] = {}
        self.stamp: dict[Hashable, int] = {}
        self.heap: list = []
        self.history = (Queue(budget), Queue(budget))  # evicted by LRU, by LFU
        self.evicted_at: dict[Hashable, int] = {}
        self.w_lru = 0.5
        self.clock = 0
        self.draws = 0

    def admit(self, key):
        for expert, history in enumerate(self.history):
            if key in history:
                history.pop(key)
                regret = math.exp(
                    -self.learning_rate * self.discount ** (self.clock - self.evicted_at.pop(key))
                )
                w_lru, w_lfu = self.w_lru, 1.0 - self.w_lru
                if expert == 0:
                    w_lru *= regret
                else:
                    w_lfu *= regret
                self.w_lru = w_lru / (w_lru + w_lfu)

    def _use(self, key, count: int, cold: bool = False):
        self.clock += 1
        self.count[key] = count
        self.stamp[key] = -self.clock if cold else self.clock
        heapq.heappush(self.heap, (count, self.stamp[key], key))

    def add(self, key):
        self.lru.add(key)
        self._use(key, 1)

    def add_cold(self, key):
        self.lru.add_cold(key)
        self._use(key, 0, cold=True)

    def touch(self, key):
        self.lru.touch(key)
        self._use(key, self.count[key] + 1)

    def remove(self, key):
        self.lru.remove(key)
        del self.count[key], self.stamp[key]

    def evict(self, incoming):
        by_lru = next(iter(self.lru.order))
        by_lfu = _live_min(self.heap, self.stamp)
        victim, expert = by_lru, None
        if by_lfu != by_lru:
            expert = 0 if uniform(self.budget.seed, self.draws) < self.w_lru else 1
            self.draws += 1
            victim = (by_lru, by_lfu)[expert]
        self.remove(victim)
        if expert is not None:
            history = self.history[expert]
            history.push(victim)
            self.evicted_at[victim] = self.clock
            while history.bytes > self.budget.capacity // 2:
                del self.evicted_at[history.pop()]
        return victim

    def __len__(self):
        return len(self.count)


MASK64 = (1 << 64) - 1


def uniform(seed: int, n: int) -> float:
    """The n-th draw in [0, 1) of the stream `seed` (SplitMix64): a pure function of both, so a
    compiled replay continues a reference cache's stream from its count of draws."""
    z = (seed + (n + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


class LeastStale(Policy):
    """Layer-aware eviction in the spirit of SpecMD's Least-Stale (Hoang et al. 2026,
    arXiv:2602.03921): decode visits layers 0..L-1 in order for every token, so a slice of a
    layer the current token has already passed is not needed before the next token, while the
    layers ahead are needed within this pass. The victim is the least recently used slice of
    a layer before the entering slice's (the token's position: a demand fetch's layer, or the
    layer a prefetch fetches for); with none resident, the least recently used slice.

    The definition is this project's: the paper's abstract (all we consulted) does not give
    it in these terms, and it may differ in what counts as the current position (here the
    entering slice's layer, so prefetches move it ahead), in applying to slices and to each
    pool separately (the LSB pool follows the same rule), and in its order within the passed
    layers (here plain recency, cold inserts lowest).
    """

    def __init__(self, budget: Budget):
        # layer -> key -> stamp, oldest first; cold inserts get negative stamps, latest lowest
        self.layers: dict[int, OrderedDict] = defaultdict(OrderedDict)
        self.clock = 0
        self.n = 0

    def add(self, key):
        self.clock += 1
        self.layers[key[0]][key] = self.clock
        self.n += 1

    def add_cold(self, key):
        self.clock += 1
        self.layers[key[0]][key] = -self.clock
        self.layers[key[0]].move_to_end(key, last=False)
        self.n += 1

    def touch(self, key):
        self.clock += 1
        self.layers[key[0]][key] = self.clock
        self.layers[key[0]].move_to_end(key)

    def remove(self, key):
        del self.layers[key[0]][key]
        self.n -= 1

    def evict(self, incoming):
        oldest = [(next(iter(d.values())), layer) for layer, d in self.layers.items() if d]
        passed = [o for o in oldest if o[1] < incoming[0]]
        _, layer = min(passed or oldest)
        key = next(iter(self.layers[layer]))
        self.remove(key)
        return key

    def __len__(self):
        return self.n


EVICTION = {
    "lru": LRU,
    "fifo": FIFO,
    "lfu": LFU,
    "belady": Belady,
    "arc": ARC,
    "slru": SLRU,
    "s3fifo": S3FIFO,
    "lrfu": LRFU,
    "lecar": LeCaR,
    "least_stale": LeastStale,
}


def eviction_params(cache_cfg) -> dict:
    """The parameters of `cache_cfg.eviction`'s policy from the cache.* config fields it names
    (its CONFIG), as its keyword arguments."""
    cls = EVICTION[cache_cfg.eviction]
    return {kw: getattr(cache_cfg, name) for kw, name in cls.CONFIG.items()}


def make_policy(name: str, budget: Budget, params: dict | None = None, future=None):
    if name not in EVICTION:
        raise ValueError(f"cache.eviction={name!r} is unknown; choose one of {sorted(EVICTION)}")
    cls, params = EVICTION[name], params or {}
    missing = [f"cache.{field}" for kw, field in cls.CONFIG.items() if kw not in params]
    if missing:
        raise ValueError(
            f"cache.eviction={name} needs {', '.join(missing)}: pass "
            "params=eviction_params(cfg.cache)"
        )
    if name == "belady":
        if future is None:
            raise ValueError("cache.eviction=belady needs the future request sequence")
        return Belady(budget, future)
    return cls(budget, **{kw: params[kw] for kw in cls.CONFIG})


# --- statistics ----------------------------------------------------------------------------


@dataclass
class Stats:
    """Counters per slice kind; only updated while `counting` is on. Run metrics are computed
    from these per decode step (slicemoe.metrics), so windows are slices of steps."""

    requests: dict = field(default_factory=lambda: defaultdict(int))
    hits: dict = field(default_factory=lambda: defaultdict(int))
    bytes_missed: dict = field(default_factory=lambda: defaultdict(int))
    activations: int = 0
    prefetch_bytes: int = 0  # slices fetched ahead of their request (slicemoe.prefetch)
    prefetch_used_bytes: int = 0  # ... of which were requested before being evicted

    def misses(self, kind: str | None = None) -> int:
        kinds = KINDS if kind is None else (kind,)
        return sum(self.requests[k] - self.hits[k] for k in kinds)

    def total_requests(self, kind: str | None = None) -> int:
        kinds = KINDS if kind is None else (kind,)
        return sum(self.requests[k] for k in kinds)

    def miss_rate(self, kind: str | None = None) -> float:
        n = self.total_requests(kind)
        return self.misses(kind) / n if n else float("nan")

    @property
    def flash_bytes(self) -> int:
        return sum(self.bytes_missed.values())


# --- the cache -----------------------------------------------------------------------------


class SliceCache:
    """Byte-capacity cache of expert slices with a low-priority LSB pool.

    `sizes` maps kind -> bytes of one slice of that kind (experts of a model are uniform).
    """

    def __init__(
        self,
        capacity: int,
        sizes: dict[str, int],
        num_layers: int,
        num_experts: int,
        eviction: str = "lru",
        future: Sequence[Key] | None = None,
        params: dict | None = None,
        seed: int = 0,
    ):
        """`params`: the eviction policy's parameters (eviction_params(cfg.cache)); `seed`: of
        the policy's random choices (each pool draws its own stream)."""
        if capacity < max(sizes.get("MSB", 0), sizes.get("FULL", 0)):
            raise ValueError(
                f"cache capacity {capacity} B cannot hold one expert slice "
                f"({max(sizes.values())} B); raise cache.frac or cache.bytes"
            )
        self.capacity = capacity
        self.sizes = sizes
        self.used = 0
        # Belady sees one global sequence; the LSB pool keeps plain LRU so the oracle's view of
        # time stays consistent (it only orders the MSB/FULL pool).
        self.main = make_policy(eviction, Budget(capacity, sizes, 2 * seed), params, future)
        low = Budget(capacity, sizes, 2 * seed + 1)
        self.low = LRU(low) if eviction == "belady" else make_policy(eviction, low, params)
        self.entries: set[Key] = set()
        self.prefetched: set[Key] = set()  # entries a prefetch put in, not yet requested
        # resident[layer, expert]: an MSB or FULL slice is in DRAM. Routing reads this directly.
        self.resident = np.zeros((num_layers, num_experts), dtype=bool)
        self.stats = Stats()
        self.counting = True
        # When a list: every request is appended as (*tag, layer, expert, kind, bytes, hit), the
        # owner setting `tag` (e.g. sequence, phase, step) before issuing requests.
        self.trace: list | None = None
        self.tag: tuple = ()

    def __contains__(self, key: Key) -> bool:
        return key in self.entries

    def _pool(self, key: Key):
        return self.low if key[2] == "LSB" else self.main

    def evict(self, key: Key) -> None:
        """The owner evicts `key` (its policy keeps no history of it)."""
        self._pool(key).remove(key)
        self._drop(key)

    def _drop(self, key: Key) -> None:
        self.entries.remove(key)
        self.prefetched.discard(key)
        self.used -= self.sizes[key[2]]
        if key[2] != "LSB":
            # With bits.scheme=base an expert may hold both of its copies (MSB and FULL).
            layer, expert = key[0], key[1]
            self.resident[layer, expert] = any(
                (layer, expert, kind) in self.entries for kind in ("MSB", "FULL")
            )

    def _make_room(self, incoming: Key) -> None:
        while self.used + self.sizes[incoming[2]] > self.capacity:
            pool = self.low if len(self.low) else self.main
            self._drop(pool.evict(incoming))

    def insert(self, key: Key, cold: bool = False) -> None:
        """Place a slice without counting a request (used by warmup strategies); `cold` enters
        it at the evict-first end of its pool."""
        if key in self.entries:
            return
        pool = self._pool(key)
        pool.admit(key)
        self._make_room(key)
        self.entries.add(key)
        (pool.add_cold if cold else pool.add)(key)
        self.used += self.sizes[key[2]]
        if key[2] != "LSB":
            self.resident[key[0], key[1]] = True

    def request(self, key: Key, fetch: bool = True) -> bool:
        """One slice request: a hit refreshes the entry, a miss fetches it from Flash.

        With fetch=False a miss is counted but nothing moves (policy.on_miss other than fetch)."""
        hit = key in self.entries
        if hit:
            self._pool(key).touch(key)
            if key in self.prefetched:
                self.prefetched.remove(key)
                if self.counting:
                    self.stats.prefetch_used_bytes += self.sizes[key[2]]
        elif fetch:
            self.insert(key)
        nbytes = self.sizes[key[2]] if hit or fetch else 0
        if self.counting:
            s = self.stats
            s.requests[key[2]] += 1
            if hit:
                s.hits[key[2]] += 1
            else:
                s.bytes_missed[key[2]] += nbytes
        if self.trace is not None:
            self.trace.append((*self.tag, key[0], key[1], key[2], nbytes, hit))
        return hit

    def prefetch(self, key: Key, cold: bool = False) -> int:
        """Fetch a slice ahead of its request (no request is counted); the bytes moved, 0 when
        it is already in DRAM, where it is refreshed unless `cold` (so that the slices fetched
        next for the same layer do not push it out). `cold` enters a fetched slice at the
        evict-first end of its pool."""
        if key in self.entries:
            if not cold:
                self._pool(key).touch(key)
            return 0
        self.insert(key, cold)
        self.prefetched.add(key)
        nbytes = self.sizes[key[2]]
        if self.counting:
            self.stats.prefetch_bytes += nbytes
        return nbytes

    def access(self, layer: int, expert: int, kinds: Sequence[str], fetch=True) -> list[bool]:
        """One expert activation requesting the given slices, in order; `fetch`: whether a miss
        is fetched, for every slice or one per slice (slicemoe.device.expert_call)."""
        if self.counting:
            self.stats.activations += 1
        if isinstance(fetch, bool):
            fetch = [fetch] * len(kinds)
        return [self.request((layer, expert, k), f) for k, f in zip(kinds, fetch)]

    def contents(self) -> set[Key]:
        return set(self.entries)
