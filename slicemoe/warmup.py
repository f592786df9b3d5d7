"""Cache state at the prefill -> decode switch (DESIGN.md section 5).

Prefill streams every expert a layer uses through the cache, layer after layer, so when decode
starts the cache holds mostly the last layers' experts: the wrong ones for decode, which starts
again at layer 0. A warmup strategy reshapes the cache at the switch. Each strategy is a
function `(cache, counts, kind, rng) -> None` where `counts[layer, expert]` is how many prefill
tokens routed to that expert and `kind` is the slice that makes an expert usable at low cost
("MSB" for sliced configurations, "FULL" otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from slicemoe.cache import SliceCache


def _clear(cache: SliceCache) -> None:
    for key in list(cache.entries):
        cache.evict(key)


def _fill(cache: SliceCache, experts, kind: str) -> None:
    """Insert slices in the given order while they fit, so the last inserted is the most
    recently used. `experts` is best-last."""
    room = cache.capacity // cache.sizes[kind]
    chosen = list(experts)[-room:] if room else []
    for layer, expert in chosen:
        cache.insert((int(layer), int(expert), kind))


def empty(cache, counts, kind, rng):
    _clear(cache)


def lru(cache, counts, kind, rng):
    """Keep whatever prefill streaming left."""


def last_layer(cache, counts, kind, rng):
    """Keep only the entries of the last layer prefill touched."""
    last = max((k[0] for k in cache.entries), default=None)
    for key in list(cache.entries):
        if key[0] != last:
            cache.evict(key)


def random(cache, counts, kind, rng):
    """Fill the cache with uniformly chosen experts (seeded)."""
    _clear(cache)
    num_layers, num_experts = counts.shape
    perm = rng.permutation(num_layers * num_experts)
    _fill(cache, [divmod(int(i), num_experts) for i in perm], kind)


def pcw(cache, counts, kind, rng):
    """Prefill-guided warmup: LSB slices go first, then the slices of experts that prefill used
    least; the survivors are ordered in the LRU by prefill hotness (hottest most recent).

    Every expert with a nonzero count was streamed during prefill, so keeping the hottest of
    them equals evicting progressively by hotness while streaming. Ties go to earlier layers,
    which decode reaches first.
    """
    _clear(cache)
    layers, experts = np.nonzero(counts)
    hot = counts[layers, experts]
    # lexsort's last key is primary: ascending hotness, then later layers first among ties.
    order = np.lexsort((-layers, hot))
    _fill(cache, zip(layers[order], experts[order]), kind)


WARMUP: dict[str, Callable] = {
    "empty": empty,
    "lru": lru,
    "last_layer": last_layer,
    "random": random,
    "pcw": pcw,
}


def apply_warmup(name: str, cache: SliceCache, counts: np.ndarray, kind: str, rng) -> int:
    """Reshape `cache` by the named strategy; returns the bytes it had to read from Flash.

    A slice of an expert that prefill routed to was streamed through DRAM, so a strategy that
    keeps it (PCW) decides at streaming time and pays nothing extra. A slice of an expert that
    prefill never used (`random` fills) is a Flash read like any miss.
    """
    if name not in WARMUP:
        raise ValueError(f"policy.warmup={name!r} is unknown; choose one of {sorted(WARMUP)}")
    counts = np.asarray(counts)
    before = cache.contents()
    WARMUP[name](cache, counts, kind, rng)
    loaded = cache.contents() - before
    return sum(cache.sizes[k[2]] for k in loaded if counts[k[0], k[1]] == 0)
