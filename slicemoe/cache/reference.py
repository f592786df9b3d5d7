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
from collections import OrderedDict, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

KINDS = ("MSB", "LSB", "FULL")
KIND_CODE = {k: i for i, k in enumerate(KINDS)}  # MSB 0, LSB 1, FULL 2 (array form)
Key = tuple  # (layer, expert, kind)


# --- eviction policies: add / touch / remove / victim -------------------------------------


class LRU:
    def __init__(self):
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

    def victim(self):
        return next(iter(self.order))

    def __len__(self):
        return len(self.order)


class FIFO(LRU):
    def touch(self, key):
        pass


class LFU:
    """Least frequently used since insertion; ties go to the least recently used."""

    def __init__(self):
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

    def victim(self):
        # Entries of keys touched, removed or re-inserted since they were pushed are stale; the
        # stamp (not the count) tells them apart, so a re-inserted key is as recent as it is.
        while True:
            _, clock, key = self.heap[0]
            if self.stamp.get(key) == clock:
                return key
            heapq.heappop(self.heap)

    def __len__(self):
        return len(self.count)


class Belady:
    """Evicts the entry whose next request is furthest away (optimal; an oracle bound).

    It is given the whole future request sequence and counts requests itself: the cache calls
    exactly one of add/touch per request, so the n-th call is request n.
    """

    def __init__(self, future: Sequence[Hashable]):
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

    def victim(self):
        while True:
            neg, key = self.heap[0]
            if self.when.get(key) == -neg:
                return key
            heapq.heappop(self.heap)

    def __len__(self):
        return len(self.when)


EVICTION = {"lru": LRU, "fifo": FIFO, "lfu": LFU, "belady": Belady}


def make_policy(name: str, future=None):
    if name not in EVICTION:
        raise ValueError(f"cache.eviction={name!r} is unknown; choose one of {sorted(EVICTION)}")
    if name == "belady":
        if future is None:
            raise ValueError("cache.eviction=belady needs the future request sequence")
        return Belady(future)
    return EVICTION[name]()


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
    ):
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
        self.main = make_policy(eviction, future)
        self.low = LRU() if eviction == "belady" else make_policy(eviction)
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
        self.entries.remove(key)
        self.prefetched.discard(key)
        self._pool(key).remove(key)
        self.used -= self.sizes[key[2]]
        if key[2] != "LSB":
            # With bits.scheme=base an expert may hold both of its copies (MSB and FULL).
            layer, expert = key[0], key[1]
            self.resident[layer, expert] = any(
                (layer, expert, kind) in self.entries for kind in ("MSB", "FULL")
            )

    def _make_room(self, nbytes: int) -> None:
        while self.used + nbytes > self.capacity:
            pool = self.low if len(self.low) else self.main
            self.evict(pool.victim())

    def insert(self, key: Key, cold: bool = False) -> None:
        """Place a slice without counting a request (used by warmup strategies); `cold` enters
        it at the evict-first end of its pool."""
        if key in self.entries:
            return
        self._make_room(self.sizes[key[2]])
        self.entries.add(key)
        pool = self._pool(key)
        (pool.add_cold if cold else pool.add)(key)
        self.used += self.sizes[key[2]]
        if key[2] != "LSB":
            self.resident[key[0], key[1]] = True

    def request(self, key: Key, fetch: bool = True) -> bool:
        """One slice request: a hit refreshes the entry, a miss fetches it from Flash.

        With fetch=False a miss is counted but nothing moves (DBSC's lsb_miss=skip)."""
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

    def access(self, layer: int, expert: int, kinds: Iterable[str], fetch_lsb=True) -> list[bool]:
        """One expert activation requesting the given slices, in order."""
        if self.counting:
            self.stats.activations += 1
        return [self.request((layer, expert, k), fetch_lsb or k != "LSB") for k in kinds]

    def contents(self) -> set[Key]:
        return set(self.entries)
