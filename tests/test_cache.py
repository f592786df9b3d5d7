import math
import random
from collections import OrderedDict
from dataclasses import replace

import pytest

from slicemoe.cache import SliceCache, eviction_params
from slicemoe.config import CacheConfig, ModelConfig, RunConfig
from slicemoe.validate import ConfigError, validate

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


# --- the policies beyond LRU/LFU/FIFO/Belady -------------------------------------------------------


def policy_cache(eviction, capacity, seed=0, **over):
    params = eviction_params(replace(CacheConfig(eviction=eviction), **over))
    return SliceCache(
        capacity, {"FULL": 1, "MSB": 1, "LSB": 1}, 3, 20000, eviction, params=params, seed=seed
    )


def hits_of(cache, seq, layer=0):
    return [cache.request((layer, e, "FULL")) for e in seq]


def libcachesim_hits(lcs, cache, seq):
    req, out = lcs.Request(), []
    for obj in seq:
        req.obj_id, req.obj_size = obj, 1
        out.append(bool(cache.get(req)))
    return out


def skewed(rng, n_items, n=1500):
    """Half a heavy-tailed hot set, half uniform over n_items."""
    return [
        int(rng.paretovariate(0.8)) % n_items if rng.random() < 0.5 else rng.randrange(n_items)
        for _ in range(n)
    ]


# libCacheSim's S3-FIFO admits nothing into a small FIFO smaller than 2 objects, and its queue
# shares round down: capacities of 20 and more, multiples of 10, keep both exact.
CAPACITIES = (20, 30, 50, 100)


@pytest.mark.parametrize("eviction", ["arc", "s3fifo"])
def test_arc_and_s3fifo_hit_exactly_as_libcachesim(eviction):
    lcs = pytest.importorskip("libcachesim")
    make = {"arc": lcs.ARC, "s3fifo": lcs.S3FIFO}[eviction]
    rng = random.Random(11)
    for capacity in CAPACITIES:
        seq = skewed(rng, rng.randint(capacity + 10, 6 * capacity))
        ours = hits_of(policy_cache(eviction, capacity), seq)
        theirs = libcachesim_hits(lcs, make(cache_size=capacity, hashpower=10), seq)
        assert ours == theirs, (eviction, capacity)
        assert 0.2 < sum(ours) / len(ours) < 0.95  # evictions matter


def test_slru_hits_exactly_as_libcachesim_once_the_protected_segment_is_full():
    """libCacheSim's SLRU (two segments of 20 % and 80 %) puts a new object in the first
    segment with room, so while the cache fills, objects enter the protected segment unused;
    ours always enters probation. After a prefix that fills the protected segment (each object
    requested twice), both evict from a full probation segment and must agree."""
    lcs = pytest.importorskip("libcachesim")
    from libcachesim.cache import CacheBase, _create_common_params
    from libcachesim.libcachesim_python import SLRU_init

    rng = random.Random(5)
    for capacity in CAPACITIES:
        prefix = [x for i in range(int(0.8 * capacity)) for x in (10_000 + i,) * 2]
        seq = prefix + skewed(rng, rng.randint(capacity + 10, 6 * capacity))
        ours = hits_of(policy_cache("slru", capacity, slru_protected=0.8), seq)
        params = _create_common_params(capacity, hashpower=10)
        theirs = libcachesim_hits(lcs, CacheBase(SLRU_init(params, "seg-size=2:8")), seq)
        assert ours[len(prefix) :] == theirs[len(prefix) :], capacity
        assert sum(ours[len(prefix) :]) < len(seq) - len(prefix)


@pytest.mark.parametrize("w_lru", [1.0, 0.0])
def test_lecar_experts_choose_as_libcachesims(w_lru):
    """LeCaR draws between its experts with its own generator (libCacheSim: next_rand() % 100,
    ours: SplitMix64 from the cache's seed), so hits agree only where no draw decides: with the
    weight held at 1 (always the LRU expert) or 0 (always the LFU expert, ties to the least
    recently used, counts from 1 on entry), as libCacheSim's LeCaR without weight updates."""
    lcs = pytest.importorskip("libcachesim")
    rng = random.Random(3)
    for capacity in CAPACITIES:
        seq = skewed(rng, rng.randint(capacity + 10, 6 * capacity))
        cache = policy_cache("lecar", capacity, lecar_learning_rate=1e-300)
        cache.main.w_lru = w_lru  # held: exp(-1e-300 x ...) is 1.0
        ours = hits_of(cache, seq)
        theirs = libcachesim_hits(
            lcs,
            lcs.LeCaR(cache_size=capacity, update_weight=False, lru_weight=w_lru, hashpower=10),
            seq,
        )
        assert ours == theirs, capacity
        assert cache.main.w_lru == w_lru


def test_lecar_is_deterministic_per_seed_and_learns_from_its_histories():
    rng = random.Random(9)
    seq = skewed(rng, 200, 3000)
    runs = [policy_cache("lecar", 30, seed=s) for s in (4, 4, 5)]
    hits = [hits_of(c, seq) for c in runs]
    assert hits[0] == hits[1] and runs[0].main.draws > 100
    assert runs[0].main.w_lru != 0.5  # regrets moved the weight
    assert hits[0] != hits[2]  # another seed draws otherwise


def test_lecar_weight_after_one_regret_of_the_lru_expert():
    """Room for 2 (N = 2 slots, so d = 0.005^(1/2)), learning rate 0.45, each use a tick.
    1 1 2 (clocks 1-3), then 3 misses: LRU's choice is 1 (used at 2), LFU's is 2 (count 1 < 2);
    with w_lru held at 1 the draw picks LRU: 1 enters LRU's history at clock 3. 4 misses
    (clock 5): both experts pick 2 (LFU's tie goes to the least recent): no draw, no history.
    1 misses at clock 6, t = 6 - 1 - 3 = 2 uses after its eviction: with w_lru = w_lfu = 0.5,
    w_lru becomes 0.5 r / (0.5 r + 0.5), r = exp(-0.45 d^2) = exp(-0.45 x 0.005)."""
    cache = policy_cache("lecar", 2)
    lecar = cache.main
    lecar.w_lru = 1.0
    assert hits_of(cache, [1, 1, 2, 3, 4]) == [0, 1, 0, 0, 0]
    assert lecar.evicted_at == {(0, 1, "FULL"): 3} and lecar.draws == 1
    lecar.w_lru = 0.5
    hits_of(cache, [1])
    r = math.exp(-0.45 * 0.005)
    assert lecar.w_lru == pytest.approx(r / (r + 1), rel=1e-12)
    assert lecar.evicted_at == {} and lecar.draws == 1


def test_lrfu_golden_hits_on_a_hand_worked_sequence():
    """Room for 2, lambda = 0.5, CRF(t) = sum over uses of 2^(-0.5 (t - use)):
    t1 A miss (A: 1)          t2 B miss (B: 1)          t3 A hit (A: 1 + 2^-1 = 1.5)
    t4 C miss: A 1.5 x 2^-0.5 = 1.06, B 2^-1 = 0.5: B goes      (C: 1 at t4)
    t5 B miss: A 1.5 x 2^-1 = 0.75, C 2^-0.5 = 0.71: C goes     (B: 1 at t5)
    t6 C miss: A 1.5 x 2^-1.5 = 0.53, B 2^-0.5 = 0.71: A goes   (C: 1 at t6)
    t7 A miss: B 2^-1 = 0.5, C 2^-0.5 = 0.71: B goes
    One hit; LRU hits at t3 and t6 (C stays over A), LFU at t3 and t7 (A's count 2 keeps it)."""
    seq = [1, 2, 1, 3, 2, 3, 1]
    assert hits_of(policy_cache("lrfu", 2, lrfu_lambda=0.5), seq) == [0, 0, 1, 0, 0, 0, 0]
    assert hits_of(policy_cache("lru", 2), seq) == [0, 0, 1, 0, 0, 1, 0]
    assert hits_of(policy_cache("lfu", 2), seq) == [0, 0, 1, 0, 0, 0, 1]


@pytest.mark.parametrize("lam, same_as", [(0.0, "lfu"), (1.0, "lru")])
def test_lrfu_ends_are_lfu_and_lru(lam, same_as):
    rng = random.Random(int(lam))
    for _ in range(5):
        capacity = rng.randint(2, 20)
        ops = [(rng.random() < 0.1, rng.randrange(40)) for _ in range(1500)]
        seen = []
        for cache in (
            policy_cache("lrfu", capacity, lrfu_lambda=lam),
            policy_cache(same_as, capacity),
        ):
            out = []
            for cold, e in ops:  # cold prefetches too: both put them lowest, the latest first
                out.append(
                    cache.prefetch((0, e, "FULL"), cold=True)
                    if cold
                    else cache.request((0, e, "FULL"))
                )
            seen.append(out)
        assert seen[0] == seen[1]


def test_least_stale_golden_hits_on_a_hand_worked_decode():
    """Room for 3 MSB slices, three layers, one expert per layer and token, (layer, expert):
    token 1: (0,0) (1,0) (2,0) fill the cache.
    token 2: (0,1) misses at layer 0: no layer passed, so the least recently used, (0,0), goes;
             (1,0) hits; (2,1) misses at layer 2: of the passed layers' slices (0,1) (used at
             4) and (1,0) (at 5), (0,1) goes, though (2,0) (at 3) is older.
    token 3: (0,1) misses at layer 0: plain LRU, (2,0) goes; (1,0) and (2,1) hit.
    Three hits; LRU evicts (2,0) at token 2 instead and hits (0,1) at token 3: four."""
    seq = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 0), (2, 1), (0, 1), (1, 0), (2, 1)]
    for eviction, hits in (("least_stale", [5, 8, 9]), ("lru", [5, 7, 8, 9])):
        cache = SliceCache(3, {"MSB": 1, "LSB": 1, "FULL": 1}, 3, 2, eviction)
        got = [cache.request((layer, e, "MSB")) for layer, e in seq]
        assert [i + 1 for i, hit in enumerate(got) if hit] == hits, eviction


def test_a_policy_without_its_parameters_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="cache.slru_protected"):
        SliceCache(4, {"FULL": 1}, 1, 4, "slru")


@pytest.mark.parametrize("eviction", ["arc", "slru", "s3fifo", "lrfu", "lecar", "least_stale"])
def test_the_tensor_backend_refuses_the_policies_it_lacks(eviction):
    cfg = RunConfig(model=ModelConfig(backend="tensor"), cache=CacheConfig(eviction=eviction))
    with pytest.raises(
        ConfigError, match=f"has only lru, fifo, lfu.*cache.eviction={eviction}"
    ) as err:
        validate(cfg, weights=False)
    assert err.value.field == "model.backend"
    validate(replace(cfg, model=ModelConfig(backend="python")), weights=False)
