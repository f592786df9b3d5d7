from dataclasses import replace

import numpy as np
import pytest

from slicemoe.cache import SliceCache
from slicemoe.config import BitsConfig, CacheConfig, EvalConfig, PolicyConfig, RunConfig
from slicemoe.replay import replay
from slicemoe.run import record
from slicemoe.warmup import apply_warmup

SIZES = {"MSB": 2, "LSB": 1, "FULL": 3}
SLICED = ("MSB", "LSB")  # what prefill streams of a sliced configuration


def prefilled_cache():
    """A cache as layer-wise prefill streaming leaves it: mostly the last layers' slices."""
    cache = SliceCache(8, SIZES, 3, 4)
    for key in [(1, 0, "MSB"), (1, 0, "LSB"), (2, 1, "MSB"), (2, 3, "MSB"), (2, 3, "LSB")]:
        cache.request(key)
    return cache


COUNTS = np.array([[5, 0, 1, 0], [2, 0, 0, 7], [0, 3, 0, 3]])


def run(name, seed=0):
    cache = prefilled_cache()
    apply_warmup(name, cache, COUNTS, SLICED, "MSB", np.random.default_rng(seed))
    return cache


def streamed(capacity, counts=COUNTS, kinds=SLICED):
    """A fresh cache after prefill streamed every used expert, layer by layer (LRU state)."""
    cache = SliceCache(capacity, SIZES, *counts.shape)
    for layer, expert in zip(*np.nonzero(counts)):
        cache.access(int(layer), int(expert), kinds)
    return cache


def test_empty_and_lru():
    assert run("empty").contents() == set()
    assert run("lru").contents() == prefilled_cache().contents()


def test_last_layer_keeps_only_the_last_layer():
    assert run("last_layer").contents() == {(2, 1, "MSB"), (2, 3, "MSB"), (2, 3, "LSB")}


def test_random_is_seeded_and_fills_with_msb_slices():
    a, b, c = run("random", 1), run("random", 1), run("random", 2)
    assert a.contents() == b.contents()
    assert len(a.contents()) == 4 and all(k[2] == "MSB" for k in a.contents())
    assert a.contents() != c.contents()


def test_a_warmup_pays_for_the_slices_prefill_did_not_stream():
    rng = np.random.default_rng(3)
    cache = prefilled_cache()
    paid = apply_warmup("random", cache, COUNTS, SLICED, "MSB", rng)
    unused = [k for k in cache.contents() if COUNTS[k[0], k[1]] == 0]
    assert paid == SIZES["MSB"] * len(unused) > 0
    # bits.scheme=base: prefill streamed whole high-bit experts, so every low-bit copy is read.
    cache = streamed(8, kinds=("FULL",))
    paid = apply_warmup("random", cache, COUNTS, ("FULL",), "MSB", np.random.default_rng(3))
    assert paid == SIZES["MSB"] * len(cache.contents()) == 8


def test_pcw_keeps_the_hottest_msb_slices_in_hotness_order():
    cache = run("pcw")
    # Capacity 8 holds four MSB slices; hottest: (1,3)=7, (0,0)=5, then the ties at 3:
    # (2,1) and (2,3); (1,0)=2 and (0,2)=1 are dropped, as are all LSB slices.
    assert cache.contents() == {(1, 3, "MSB"), (0, 0, "MSB"), (2, 1, "MSB"), (2, 3, "MSB")}
    # LRU order: the coldest first, so it is evicted first; the hottest last (equal counts in
    # one layer keep expert order).
    assert list(cache.main.order) == [(2, 1, "MSB"), (2, 3, "MSB"), (0, 0, "MSB"), (1, 3, "MSB")]


def test_pcw_keeps_what_streaming_evicted_without_reading_flash():
    lru = streamed(8)
    # LRU streaming kept the last layers; (0,0), the second hottest, went.
    assert (0, 0, "MSB") not in lru
    paid = apply_warmup("pcw", lru, COUNTS, SLICED, "MSB", np.random.default_rng(0))
    assert (0, 0, "MSB") in lru and paid == 0


def test_pcw_where_everything_fits_keeps_it_all_hottest_last():
    lru, pcw = streamed(18), streamed(18)  # six experts used: 6 x (2 + 1) bytes
    apply_warmup("pcw", pcw, COUNTS, SLICED, "MSB", np.random.default_rng(0))
    assert pcw.contents() == lru.contents() and len(pcw.contents()) == 12
    hot = [(0, 2), (1, 0), (2, 1), (2, 3), (0, 0), (1, 3)]  # coldest first, ties: later layer
    assert list(pcw.main.order) == [(la, e, "MSB") for la, e in hot]
    assert list(pcw.low.order) == [(la, e, "LSB") for la, e in hot]


def test_pcw_drops_lsb_slices_only_for_room_coldest_first():
    cache = streamed(16)  # two bytes short: the two coldest LSB slices go, every MSB stays
    apply_warmup("pcw", cache, COUNTS, SLICED, "MSB", np.random.default_rng(0))
    msb = {(la, e, "MSB") for la, e in zip(*np.nonzero(COUNTS))}
    assert {k for k in cache.contents() if k[2] == "MSB"} == msb
    assert list(cache.low.order) == [(2, 1, "LSB"), (2, 3, "LSB"), (0, 0, "LSB"), (1, 3, "LSB")]
    # LRU streaming made the same room from the oldest LSB slices, the hot (0,0)'s among them.
    assert (0, 0, "LSB") not in streamed(16)


def test_pcw_drops_msb_slices_by_ascending_prefill_count_once_lsb_are_gone():
    cache = streamed(7)  # three MSB slices fit (6 bytes), the last byte stays free
    apply_warmup("pcw", cache, COUNTS, SLICED, "MSB", np.random.default_rng(0))
    # (0,2)=1 and (1,0)=2 go, then (2,1) of the tie at 3 in layer 2 (expert order).
    assert list(cache.main.order) == [(2, 3, "MSB"), (0, 0, "MSB"), (1, 3, "MSB")]
    assert len(cache.low) == 0


def test_pcw_ties_prefer_earlier_layers():
    cache = SliceCache(4, SIZES, 3, 4)
    counts = np.array([[0, 2, 0, 0], [0, 0, 2, 0], [2, 0, 0, 0]])
    apply_warmup("pcw", cache, counts, SLICED, "MSB", np.random.default_rng(0))
    assert cache.contents() == {(0, 1, "MSB"), (1, 2, "MSB")}


def test_unknown_warmup_names_the_field():
    with pytest.raises(ValueError, match="policy.warmup"):
        apply_warmup("hot", prefilled_cache(), COUNTS, SLICED, "MSB", np.random.default_rng(0))


def test_pcw_never_misses_more_than_lru_when_every_slice_fits():
    """The tiny model, MAT42 DBSC: at frac 1.0 and 2.0 the cache holds every slice of every
    expert, so PCW (which keeps all prefill streamed) must miss no more than the LRU state."""
    cfg = RunConfig(
        eval=EvalConfig(limit=3, max_new_tokens=16),
        batch_size=3,
        bits=BitsConfig(name="mat42", high=4, low=2),
        policy=PolicyConfig(precision="dbsc", tau=0.5),
    )
    stream = record(cfg)
    for frac in (1.0, 2.0):
        r = {
            w: replay(
                stream,
                replace(cfg, cache=CacheConfig(frac=frac), policy=replace(cfg.policy, warmup=w)),
            )
            for w in ("lru", "pcw")
        }
        assert r["pcw"]["flash_bytes_warmup"] == 0
        assert r["pcw"]["miss_rate"] <= r["lru"]["miss_rate"], frac
        assert r["pcw"]["energy_decode_j"] <= r["lru"]["energy_decode_j"], frac
        assert r["pcw"]["miss_rate_lsb"] <= r["lru"]["miss_rate_lsb"], frac
