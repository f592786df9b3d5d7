import random
from collections import OrderedDict

import pytest

from slicemoe.cache import SliceCache

# The textbook page-reference string that shows Belady's anomaly for FIFO.
CLASSIC = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]


def replay(seq, capacity, eviction, sizes=None, kinds=None):
    sizes = sizes or {"FULL": 1, "MSB": 1, "LSB": 1}
    kinds = kinds or ["FULL"] * len(seq)
    keys = [(0, e, k) for e, k in zip(seq, kinds)]
    cache = SliceCache(capacity, sizes, 1, 64, eviction, future=keys)
    return [cache.request(k) for k in keys], cache


@pytest.mark.parametrize(
    "eviction,capacity,misses",
    [
        ("lru", 3, 10),
        ("lru", 4, 8),
        ("fifo", 3, 9),
        ("fifo", 4, 10),  # Belady's anomaly: more frames, more faults
        ("belady", 3, 7),
        ("belady", 4, 6),
        ("lfu", 3, 10),
    ],
)
def test_golden_miss_counts_on_the_classic_trace(eviction, capacity, misses):
    hits, cache = replay(CLASSIC, capacity, eviction)
    assert hits.count(False) == misses
    assert cache.stats.misses() == misses
    assert cache.stats.total_requests() == len(CLASSIC)


def test_lru_matches_libcachesim_on_random_traces():
    lcs = pytest.importorskip("libcachesim")
    rng = random.Random(7)
    for trial in range(5):
        n_items, capacity = rng.randint(5, 60), rng.randint(2, 30)
        seq = [int(rng.paretovariate(1.2)) % n_items for _ in range(3000)]
        ours, _ = replay(seq, capacity, "lru")
        ref = lcs.LRU(cache_size=capacity)
        req = lcs.Request()
        theirs = []
        for obj in seq:
            req.obj_id, req.obj_size = obj, 1
            theirs.append(bool(ref.get(req)))
        assert ours == theirs, f"trial {trial}: capacity {capacity}, {n_items} items"


def reference_slice_cache(requests, capacity, sizes):
    """A direct model of the rules: two LRU lists, LSB emptied before any MSB/FULL leaves."""
    low, main, used, out = OrderedDict(), OrderedDict(), 0, []
    for key in requests:
        pool = low if key[2] == "LSB" else main
        if key in pool:
            pool.move_to_end(key)
            out.append(True)
            continue
        out.append(False)
        while used + sizes[key[2]] > capacity:
            victim_pool = low if low else main
            victim, _ = victim_pool.popitem(last=False)
            used -= sizes[victim[2]]
        pool[key] = None
        used += sizes[key[2]]
    return out


def test_mixed_slice_sizes_match_a_reference_model():
    rng = random.Random(3)
    sizes = {"MSB": 5, "LSB": 3, "FULL": 8}
    for _ in range(5):
        reqs = []
        for _ in range(4000):
            layer, expert = rng.randrange(4), min(int(rng.expovariate(0.3)), 15)
            reqs.append((layer, expert, "MSB"))
            if rng.random() < 0.3:
                reqs.append((layer, expert, "LSB"))
        capacity = rng.randint(8, 200)
        cache = SliceCache(capacity, sizes, 4, 16)
        ours = [cache.request(k) for k in reqs]
        assert ours == reference_slice_cache(reqs, capacity, sizes)
        assert cache.used <= capacity


def test_stats_per_kind_and_flash_bytes():
    sizes = {"MSB": 4, "LSB": 4, "FULL": 8}
    cache = SliceCache(16, sizes, 2, 4)
    cache.counting = False
    cache.access(0, 0, ["MSB"])  # warm-up step: not counted
    cache.counting = True
    cache.access(0, 0, ["MSB", "LSB"])  # MSB hit, LSB miss
    cache.access(1, 2, ["MSB"])  # miss
    s = cache.stats
    assert s.activations == 2
    assert (s.requests["MSB"], s.hits["MSB"], s.requests["LSB"], s.hits["LSB"]) == (2, 1, 1, 0)
    assert s.miss_rate("MSB") == 0.5 and s.miss_rate("LSB") == 1.0
    assert s.miss_rate() == pytest.approx(2 / 3)
    assert s.flash_bytes == 8


def test_capacity_below_one_slice_is_rejected_with_the_fix():
    with pytest.raises(ValueError, match="cache.frac or cache.bytes"):
        SliceCache(3, {"MSB": 4, "LSB": 4, "FULL": 8}, 1, 1)


def test_belady_refuses_a_diverging_sequence():
    cache = SliceCache(2, {"FULL": 1}, 1, 4, "belady", future=[(0, 1, "FULL")])
    with pytest.raises(RuntimeError, match="diverges"):
        cache.request((0, 2, "FULL"))
