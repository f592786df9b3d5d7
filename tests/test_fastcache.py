"""The compiled LRU/FIFO replay against the reference SliceCache, request by request."""

from __future__ import annotations

import numpy as np
import pytest

from slicemoe.cache import KIND_CODE, KINDS, SliceCache
from slicemoe.fastcache import key_ids, replay_requests
from slicemoe.warmup import apply_warmup

LAYERS, EXPERTS = 4, 12
SIZES = {"MSB": 5, "LSB": 3, "FULL": 8}


def random_stream(rng, n):
    """Expert calls as a model makes them: MSB (+ LSB for high-bit calls) or FULL, skewed."""
    layer, expert, kind = [], [], []
    popularity = rng.zipf(1.4, size=(LAYERS, EXPERTS)).astype(float)
    popularity /= popularity.sum(1, keepdims=True)
    while len(kind) < n:
        la = int(rng.integers(LAYERS))
        e = int(rng.choice(EXPERTS, p=popularity[la]))
        call = (
            ["FULL"] if rng.random() < 0.2 else (["MSB", "LSB"] if rng.random() < 0.3 else ["MSB"])
        )
        for k in call:
            layer.append(la), expert.append(e), kind.append(KIND_CODE[k])
    return np.array(layer), np.array(expert), np.array(kind)


@pytest.mark.parametrize("eviction", ["lru", "fifo"])
@pytest.mark.parametrize("seed", range(6))
def test_compiled_replay_equals_the_reference_cache(eviction, seed):
    rng = np.random.default_rng(seed)
    capacity = int(rng.integers(10, 120))
    ref = SliceCache(capacity, SIZES, LAYERS, EXPERTS, eviction)
    # A warm start as prefill and a warmup strategy leave it.
    for la, e, k in zip(*random_stream(rng, 60)):
        ref.request((int(la), int(e), KINDS[k]))
    counts = rng.integers(0, 5, size=(LAYERS, EXPERTS))
    warmup = str(rng.choice(["lru", "pcw", "random", "last_layer", "empty"]))
    apply_warmup(warmup, ref, counts, ("MSB", "LSB"), "MSB", rng)
    layer, expert, kind = random_stream(rng, 3000)
    marks = np.sort(rng.choice(len(kind), size=50, replace=False))
    hits, resident = replay_requests(ref, key_ids(layer, expert, kind, EXPERTS), marks, eviction)

    missed_before = {k: ref.stats.bytes_missed[k] for k in KINDS}
    expected_hits, expected_resident = [], []
    for i, (la, e, k) in enumerate(zip(layer, expert, kind)):
        expected_hits.append(ref.request((int(la), int(e), KINDS[k])))
        if i in set(marks.tolist()):
            expected_resident.append(int(ref.resident.sum()))
    assert hits.tolist() == expected_hits
    assert resident.tolist() == expected_resident
    sizes = np.array([SIZES[k] for k in KINDS])
    missed_bytes = {KINDS[c]: int(sizes[c] * np.sum((kind == c) & ~hits)) for c in range(3)}
    assert missed_bytes == {k: ref.stats.bytes_missed[k] - missed_before[k] for k in KINDS}
    assert 0 < hits.mean() < 1


def test_the_starting_cache_is_left_unchanged():
    ref = SliceCache(20, SIZES, LAYERS, EXPERTS, "lru")
    ref.request((0, 1, "MSB"))
    before = (ref.contents(), ref.used, ref.resident.copy())
    replay_requests(ref, key_ids([2, 3], [4, 5], [0, 2], EXPERTS), np.array([1]), "lru")
    assert (ref.contents(), ref.used) == before[:2] and (ref.resident == before[2]).all()


def test_other_evictions_are_refused():
    ref = SliceCache(20, SIZES, LAYERS, EXPERTS, "lfu")
    with pytest.raises(ValueError, match="compiled replay"):
        replay_requests(ref, np.array([0]), np.array([0]), "lfu")
