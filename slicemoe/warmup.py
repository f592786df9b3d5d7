"""Cache state at the prefill -> decode switch (DESIGN.md section 5).

Prefill streams every expert a layer uses through the cache, layer after layer, so when decode
starts the cache holds mostly the last layers' experts: the wrong ones for decode, which starts
again at layer 0. A warmup strategy reshapes the cache at the switch. Each strategy is a
function `(cache, counts, streamed, kind, rng) -> None` where `counts[layer, expert]` is how
many prefill tokens routed to that expert, `streamed` the set of (layer, expert, kind) slices
prefill streamed through the cache, and `kind` the slice that makes an expert usable at low cost
("MSB" for sliced configurations, "FULL" otherwise).

What a warmup costs: prefill requests each slice it uses once, on the device's fresh cache, so
every streamed slice is a Flash read that prefill pays for whatever the cache evicts. Keeping a
streamed slice is a choice made while it passes through DRAM and costs nothing more; a slice
prefill did not stream (`random`'s picks of experts prefill never used; with bits.scheme=base,
the low-bit copies prefill's high path did not read) is a Flash read at the switch, charged to
prefill (`flash_bytes_warmup`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from slicemoe.cache import SliceCache


def _clear(cache: SliceCache) -> None:
    for key in list(cache.entries):
        cache.evict(key)


def empty(cache, counts, streamed, kind, rng):
    _clear(cache)


def lru(cache, counts, streamed, kind, rng):
    """Keep whatever prefill streaming left."""


def last_layer(cache, counts, streamed, kind, rng):
    """Keep only the entries of the last layer prefill touched."""
    last = max((k[0] for k in cache.entries), default=None)
    for key in list(cache.entries):
        if key[0] != last:
            cache.evict(key)


def random(cache, counts, streamed, kind, rng):
    """Fill the cache with uniformly chosen experts (seeded), the last chosen most recent."""
    _clear(cache)
    num_layers, num_experts = counts.shape
    room = cache.capacity // cache.sizes[kind]  # >= 1: a cache holds one slice of any kind
    for i in rng.permutation(num_layers * num_experts)[-room:]:
        cache.insert((*divmod(int(i), num_experts), kind))


def pcw(cache, counts, streamed, kind, rng):
    """Predictive cache warmup (SliceMoE section 4.3): prefill-guided eviction, then the LRU
    re-ordered by accumulated prefill frequency.

    The rule, over every slice prefill streamed (and any the cache held before): while they do
    not all fit, LSB slices go first, least used by prefill first; once no LSB slice is left,
    MSB (or FULL) slices go, least used first. Ties go to later layers, as decode reaches the
    earlier ones first. What stays is ordered in each pool by prefill frequency, the hottest
    most recently used (the last to be evicted in decode).

    The paper applies this eviction while prefill streams and only re-orders at the end; the
    state it leaves is the one computed here in one go: a slice kept is kept as it streams
    through DRAM, so PCW reads nothing from Flash, even for slices that plain LRU streaming
    would have evicted. Where everything prefill streamed fits, PCW keeps all of it, as LRU
    does, and only re-orders.
    """
    keys = cache.contents() | streamed
    # First to go first: LSB before MSB/FULL, then ascending prefill count, later layers first.
    order = sorted(keys, key=lambda k: (k[2] != "LSB", counts[k[0], k[1]], -k[0], k[1], k[2]))
    excess = sum(cache.sizes[k[2]] for k in order) - cache.capacity
    drop = 0
    while excess > 0:
        excess -= cache.sizes[order[drop][2]]
        drop += 1
    _clear(cache)
    for key in order[drop:]:  # each pool gets its slices coldest first: the hottest end last
        cache.insert(key)


WARMUP: dict[str, Callable] = {
    "empty": empty,
    "lru": lru,
    "last_layer": last_layer,
    "random": random,
    "pcw": pcw,
}


def apply_warmup(
    name: str, cache: SliceCache, counts: np.ndarray, prefill_kinds, kind: str, rng
) -> int:
    """Reshape `cache` by the named strategy after prefill streamed `prefill_kinds` of every
    expert with a nonzero count; returns the bytes it read from Flash (slices prefill did not
    stream)."""
    if name not in WARMUP:
        raise ValueError(f"policy.warmup={name!r} is unknown; choose one of {sorted(WARMUP)}")
    counts = np.asarray(counts)
    streamed = {
        (int(layer), int(expert), k)
        for layer, expert in zip(*np.nonzero(counts))
        for k in prefill_kinds
    }
    before = cache.contents()
    WARMUP[name](cache, counts, streamed, kind, rng)
    loaded = cache.contents() - before - streamed
    return sum(cache.sizes[k[2]] for k in loaded)
