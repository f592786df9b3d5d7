"""The slice caches of B simulated devices as tensors on the model's device.

The same cache as `reference.SliceCache` (the readable definition; tests/test_cache_conformance.py
runs both on the same sequences and compares every hit, byte and entry), held so that a decode
step never leaves the device: one row per device, one entry per (kind, layer, expert), updated by
tensor ops over all rows at once. A request or an insert is one masked operation on every row;
the k experts x slices of a layer step are a short fixed loop (`layer_step`). On CUDA,
`kernel.layer_step` runs `layer_step` as one kernel.

Each entry holds one int64 `key`, ABSENT while the slice is in Flash. The victim of a pool is the
entry with the smallest key, so the keys encode the eviction order:
- LRU: the row's clock at its last insert or hit; FIFO: at its insert;
- LFU: count * LFU_COUNT + clock + LFU_STAMP (fewest uses first, ties to the least recent);
- an entry inserted cold (at the evict-first end) gets minus the clock: below every warm entry,
  and the latest cold entry lowest, as SliceCache's `add_cold` orders them.
The LSB pool (kind LSB) is emptied before the main pool (MSB and FULL) gives up an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slicemoe.cache.reference import KIND_CODE, KINDS, SliceCache

ABSENT = 2**62
LFU_COUNT = 2**40  # LFU keys: use count x LFU_COUNT + the stamp, shifted to be non-negative
LFU_STAMP = 2**39
MSB, LSB, FULL = (KIND_CODE[k] for k in ("MSB", "LSB", "FULL"))
# Columns of `CacheState.stats`, the counters of reference.Stats.
STATS = (
    *(f"requests_{k}" for k in KINDS),
    *(f"hits_{k}" for k in KINDS),
    *(f"bytes_{k}" for k in KINDS),
    "activations",
    "prefetch_bytes",
    "prefetch_used_bytes",
)
S = {name: i for i, name in enumerate(STATS)}
EVICTIONS = ("lru", "fifo", "lfu")


@dataclass(frozen=True)
class Spec:
    """What every row shares: the geometry, byte sizes and capacity, the eviction policy, and the
    reference runtime's slice rules (slicemoe.device: slice_kinds, expert_call, fetch_ahead)."""

    layers: int
    experts: int
    sizes: tuple  # bytes of an MSB, LSB and FULL slice, by kind code
    capacity: int
    eviction: str = "lru"
    sliced: bool = True  # precision low/dbsc: experts are requested as MSB (+ LSB) slices
    nested: bool = True  # MSB + LSB is the high-bit expert (amat, trunc); base: two copies
    on_miss: str = "fetch"  # policy.on_miss
    low_bytes: int = 0  # expert bytes a low-path call reads
    prefetch_lsb: bool = False  # prefetch.slices=critical
    prefetch_cold: bool = False  # prefetch.insert=lru

    @property
    def n(self) -> int:
        return self.layers * self.experts

    @property
    def max_evictions(self) -> int:
        """Evictions one insert may need: room for the largest slice, freed by the smallest."""
        present = [s for s in self.sizes if s > 0]
        return -(-max(present) // min(present)) + 1


@dataclass
class CacheState:
    """The caches of B devices; row b is device b."""

    key: torch.Tensor  # [B, 3 * n] int64: kind-major, then layer, then expert; ABSENT if not held
    prefetched: torch.Tensor  # [B, 3 * n] bool: put in by a prefetch, not requested since
    used: torch.Tensor  # [B] int64 bytes held
    clock: torch.Tensor  # [B] int64, one tick per insert or refresh
    stats: torch.Tensor  # [B, len(STATS)] int64

    @property
    def rows(self) -> int:
        return self.key.shape[0]


def slot(spec: Spec, kind, layer, expert):
    """The entry index of (kind, layer, expert) within a row; tensors or ints alike."""
    return kind * spec.n + layer * spec.experts + expert


def empty(spec: Spec, rows: int, device) -> CacheState:
    if spec.eviction not in EVICTIONS:
        raise ValueError(f"cache.eviction={spec.eviction!r} has no tensor cache; use {EVICTIONS}")
    z = torch.zeros(rows, dtype=torch.int64, device=device)
    return CacheState(
        key=torch.full((rows, 3 * spec.n), ABSENT, dtype=torch.int64, device=device),
        prefetched=torch.zeros((rows, 3 * spec.n), dtype=torch.bool, device=device),
        used=z,
        clock=z.clone(),
        stats=torch.zeros((rows, len(STATS)), dtype=torch.int64, device=device),
    )


def from_slicecaches(spec: Spec, caches: list[SliceCache], device) -> CacheState:
    """The tensor form of SliceCaches (after prefill and warmup): contents, eviction order and
    counters carry over, so the rows continue exactly where the reference caches stand."""
    cpu = empty(spec, len(caches), "cpu")
    # Filled through NumPy views of the tensors: an element write costs a tenth as much.
    st = CacheState(*(t.numpy() for t in (cpu.key, cpu.prefetched, cpu.used, cpu.clock, cpu.stats)))
    for b, c in enumerate(caches):
        clock = 0
        for pool in (c.main, c.low):
            if spec.eviction == "lfu":
                clock = max(clock, pool.clock)
                for k, count in pool.count.items():
                    st.key[b, _slot_of(spec, k)] = count * LFU_COUNT + pool.stamp[k] + LFU_STAMP
            else:  # the order is the eviction order: rank it, after any cold stamps to come
                for rank, k in enumerate(pool.order, start=1):
                    st.key[b, _slot_of(spec, k)] = rank
                clock = max(clock, len(pool.order))
        st.clock[b] = clock
        for k in c.prefetched:
            st.prefetched[b, _slot_of(spec, k)] = True
        st.used[b] = c.used
        for kind in KINDS:
            st.stats[b, S[f"requests_{kind}"]] = c.stats.requests[kind]
            st.stats[b, S[f"hits_{kind}"]] = c.stats.hits[kind]
            st.stats[b, S[f"bytes_{kind}"]] = c.stats.bytes_missed[kind]
        st.stats[b, S["activations"]] = c.stats.activations
        st.stats[b, S["prefetch_bytes"]] = c.stats.prefetch_bytes
        st.stats[b, S["prefetch_used_bytes"]] = c.stats.prefetch_used_bytes
    return CacheState(
        *(t.to(device) for t in (cpu.key, cpu.prefetched, cpu.used, cpu.clock, cpu.stats))
    )


def _slot_of(spec: Spec, key) -> int:
    layer, expert, kind = key
    return slot(spec, KIND_CODE[kind], layer, expert)


def contents(st: CacheState, spec: Spec, row: int) -> set:
    """The (layer, expert, kind) keys row `row` holds, as SliceCache.contents gives them."""
    held = (st.key[row] != ABSENT).nonzero().flatten().tolist()
    return {(j % spec.n // spec.experts, j % spec.experts, KINDS[j // spec.n]) for j in held}


def resident(st: CacheState, spec: Spec, layer: int | None = None) -> torch.Tensor:
    """[B, layers, experts], or [B, experts] of one layer: an MSB or FULL slice of the expert is
    held (what routing reads)."""
    key = st.key.view(-1, 3, spec.layers, spec.experts)
    if layer is not None:
        key = key[:, :, layer]
    return (key[:, MSB] != ABSENT) | (key[:, FULL] != ABSENT)


# --- one operation on every row where `on` ----------------------------------------------------


def _get(t: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return t.gather(1, j[:, None])[:, 0]


def _put(t: torch.Tensor, j: torch.Tensor, on: torch.Tensor, value) -> None:
    new = torch.where(on, torch.as_tensor(value, dtype=t.dtype, device=t.device), _get(t, j))
    t.scatter_(1, j[:, None], new[:, None])


def _size(spec: Spec, kind, device) -> torch.Tensor:
    return torch.tensor(spec.sizes, device=device)[kind]


def _tick(st: CacheState, on: torch.Tensor) -> torch.Tensor:
    st.clock += on
    return st.clock


def _touch(st: CacheState, spec: Spec, on: torch.Tensor, j: torch.Tensor) -> None:
    """A hit or a refresh: LRU moves the entry to the most recent end, LFU counts one more use."""
    if spec.eviction == "fifo":
        return
    clock = _tick(st, on)
    if spec.eviction == "lru":
        _put(st.key, j, on, clock)
    else:
        count = _get(st.key, j) // LFU_COUNT + 1
        _put(st.key, j, on, count * LFU_COUNT + clock + LFU_STAMP)


def _evict(st: CacheState, spec: Spec, on: torch.Tensor, j: torch.Tensor) -> None:
    _put(st.key, j, on, ABSENT)
    _put(st.prefetched, j, on, False)
    st.used -= torch.where(on, _size(spec, j // spec.n, j.device), 0)


def _make_room(st: CacheState, spec: Spec, on: torch.Tensor, nbytes: torch.Tensor) -> None:
    """Evict, one victim at a time, until `nbytes` more fit: the LSB pool first, then the oldest
    (or least used) MSB/FULL entry."""
    n = spec.n
    for _ in range(spec.max_evictions):
        need = on & (st.used + nbytes > spec.capacity)
        low_key, low_j = st.key[:, n : 2 * n].min(1)
        main = torch.cat([st.key[:, :n], st.key[:, 2 * n :]], 1)
        main_key, main_j = main.min(1)
        main_j = torch.where(main_j < n, main_j, main_j + n)  # back to FULL's entries
        from_low = low_key != ABSENT
        victim = torch.where(from_low, low_j + n, main_j)
        need &= from_low | (main_key != ABSENT)
        _evict(st, spec, need, victim)


def insert(st: CacheState, spec: Spec, on, kind, j, cold=False) -> None:
    """SliceCache.insert: place a slice that is not held without counting a request; `cold`
    enters it at the evict-first end of its pool."""
    on = on & (_get(st.key, j) == ABSENT)
    nbytes = _size(spec, kind, j.device)
    _make_room(st, spec, on, nbytes)
    clock = _tick(st, on)
    cold = torch.as_tensor(cold, device=j.device)
    stamp = torch.where(cold, -clock, clock)
    if spec.eviction == "lfu":
        stamp = torch.where(cold, 0, 1) * LFU_COUNT + stamp + LFU_STAMP
    _put(st.key, j, on, stamp)
    st.used += torch.where(on, nbytes, 0)


def request(st: CacheState, spec: Spec, on, kind, j, fetch=True) -> torch.Tensor:
    """SliceCache.request, counted: a hit refreshes the entry, a miss fetches it from Flash
    where `fetch` (policy.on_miss may leave it there). Returns the hits."""
    held = _get(st.key, j) != ABSENT
    hit = on & held
    _touch(st, spec, hit, j)
    nbytes = _size(spec, kind, j.device)
    used = hit & _get(st.prefetched, j)
    _put(st.prefetched, j, used, False)
    st.stats[:, S["prefetch_used_bytes"]] += torch.where(used, nbytes, 0)
    fetched = on & ~held & torch.as_tensor(fetch, device=j.device)
    insert(st, spec, fetched, kind, j)
    kind = torch.as_tensor(kind, device=j.device).expand_as(j)
    for name, counted in (("requests", on), ("hits", hit)):
        st.stats.scatter_add_(1, (S[f"{name}_MSB"] + kind)[:, None], counted.long()[:, None])
    missed = torch.where(fetched, nbytes, 0).expand_as(j)
    st.stats.scatter_add_(1, (S["bytes_MSB"] + kind)[:, None], missed[:, None])
    return hit


def prefetch(st: CacheState, spec: Spec, on, kind, j, cold=False) -> torch.Tensor:
    """SliceCache.prefetch: fetch a slice ahead of its request (not counted as one), or refresh
    it where already held (unless `cold`). Returns the bytes moved."""
    held = _get(st.key, j) != ABSENT
    if not cold:
        _touch(st, spec, on & held, j)
    fetched = on & ~held
    insert(st, spec, fetched, kind, j, cold)
    _put(st.prefetched, j, fetched, True)
    moved = torch.where(fetched, _size(spec, kind, j.device), 0)
    st.stats[:, S["prefetch_bytes"]] += moved
    return moved


# --- one MoE layer of a decode step -----------------------------------------------------------


def layer_step(st: CacheState, spec: Spec, layer: int, idx, high, on, droppable=None, ahead=None):
    """The cache work of one MoE layer of one decode step on every row in `on`, as the reference
    runtime does it row by row (slicemoe.device.expert_call): expert j's slices (MSB or FULL,
    then the LSB of a high-bit MSB call) for j = 0..k-1, then the prefetch of the next layer.

    `idx`, `high` [B, k]: the chosen experts and whether each asked for its high-bit path.
    `droppable` [B, k]: the calls policy.on_miss=drop leaves out on a miss (drop only).
    `ahead`: (target layer, experts [B, m], critical [B, m], rows predicted for [B]) or None.
    Returns (served at high precision [B, k], dropped [B, k], demand Flash bytes [B], expert
    bytes read [B], prefetched bytes [B], experts resident after the requests [B] (layer 0
    only, else None)), zero for rows not in `on`.
    """
    rows, k = idx.shape
    zero = torch.zeros(rows, dtype=torch.int64, device=idx.device)
    size = torch.tensor(spec.sizes, device=idx.device)
    nested = spec.sliced and spec.nested
    served, dropped = torch.zeros_like(high), torch.zeros_like(high)
    missed, read = zero.clone(), zero.clone()
    for j in range(k):
        e, h = idx[:, j], high[:, j]
        st.stats[:, S["activations"]] += on
        first = _first_kind(spec, h, e)
        second = on & h & nested  # an LSB request follows
        # What expert_call decides from the slices held before the call.
        miss = ~_held(st, spec, first, layer, e) | (second & ~_held(st, spec, LSB, layer, e))
        substitute = spec.on_miss == "substitute" and spec.sliced
        drop = on & miss & droppable[:, j] if spec.on_miss == "drop" else torch.zeros_like(on)
        # substitute: a high-bit call whose low-bit slice (or copy) is held computes on it
        sub = on & h & miss & _held(st, spec, MSB, layer, e) if substitute else torch.zeros_like(on)
        fetch = ~(drop | sub)
        hit = request(st, spec, on, first, slot(spec, first, layer, e), fetch)
        missed += torch.where(on & ~hit & fetch, size[first], 0)
        if nested:
            fetch_lsb = fetch & (spec.on_miss != "skip_lsb")
            lsb = request(st, spec, second, LSB, slot(spec, LSB, layer, e), fetch_lsb)
            missed += torch.where(second & ~lsb & fetch_lsb, size[LSB], 0)
            high_path = second & (lsb | fetch_lsb) & ~drop
        else:
            if substitute:  # base: the high-bit copy was looked up, the low-bit one serves
                request(st, spec, sub, MSB, slot(spec, MSB, layer, e))
            high_path = (first == FULL) & (hit | fetch)
        cost = torch.where(high_path, spec.sizes[FULL], spec.low_bytes)
        read += torch.where(on & ~drop, cost, 0)
        served[:, j] = torch.where(on, high_path, h)
        dropped[:, j] = drop
    held = torch.where(on, resident(st, spec).flatten(1).sum(1), 0) if layer == 0 else None
    moved = zero.clone()
    if ahead is not None:
        target, experts, crit, predicted = ahead
        moved = fetch_ahead(st, spec, target, experts, crit, on & predicted)
    return served, dropped, missed, read, moved, held


def _held(st: CacheState, spec: Spec, kind, layer: int, e) -> torch.Tensor:
    return _get(st.key, slot(spec, kind, layer, e)) != ABSENT


def _first_kind(spec: Spec, high, e) -> torch.Tensor:
    """The first (or only) slice an expert call asks for: FULL unsliced, MSB with nested slices;
    with two copies (base) the high-bit copy (FULL) or the low-bit one (kind MSB)."""
    if spec.sliced and not spec.nested:
        return torch.where(high, FULL, MSB)
    return torch.full_like(e, MSB if spec.sliced else FULL)


def fetch_ahead(st: CacheState, spec: Spec, layer: int, experts, crit, on) -> torch.Tensor:
    """The reference runtime's fetch_ahead on every row in `on`: the MSB (or whole) slices of
    `experts` [B, m] first, then the LSB slices of the critical ones; the bytes moved."""
    moved = torch.zeros(experts.shape[0], dtype=torch.int64, device=experts.device)
    cold = spec.prefetch_cold
    for j in range(experts.shape[1]):
        e = experts[:, j]
        first = _first_kind(spec, crit[:, j] & spec.prefetch_lsb, e)
        moved += prefetch(st, spec, on, first, slot(spec, first, layer, e), cold)
    if spec.sliced and spec.nested and spec.prefetch_lsb:
        for j in range(experts.shape[1]):
            e = experts[:, j]
            moved += prefetch(st, spec, on & crit[:, j], LSB, slot(spec, LSB, layer, e), cold)
    return moved
