import numpy as np
import pytest

from slicemoe.cache import SliceCache
from slicemoe.warmup import apply_warmup

SIZES = {"MSB": 2, "LSB": 1, "FULL": 3}


def prefilled_cache():
    """A cache as layer-wise prefill streaming leaves it: mostly the last layers' slices."""
    cache = SliceCache(8, SIZES, 3, 4)
    for key in [(1, 0, "MSB"), (1, 0, "LSB"), (2, 1, "MSB"), (2, 3, "MSB"), (2, 3, "LSB")]:
        cache.request(key)
    return cache


COUNTS = np.array([[5, 0, 1, 0], [2, 0, 0, 7], [0, 3, 0, 3]])


def run(name, seed=0):
    cache = prefilled_cache()
    apply_warmup(name, cache, COUNTS, "MSB", np.random.default_rng(seed))
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


def test_pcw_keeps_the_hottest_msb_slices_in_hotness_order():
    cache = run("pcw")
    # Capacity 8 holds four MSB slices; hottest: (1,3)=7, (0,0)=5, then the ties at 3:
    # (2,1) and (2,3); (1,0)=2 and (0,2)=1 are dropped, as are all LSB slices.
    assert cache.contents() == {(1, 3, "MSB"), (0, 0, "MSB"), (2, 1, "MSB"), (2, 3, "MSB")}
    # LRU order: the coldest first, so it is evicted first; the hottest last (equal counts in
    # one layer keep expert order).
    assert list(cache.main.order) == [(2, 1, "MSB"), (2, 3, "MSB"), (0, 0, "MSB"), (1, 3, "MSB")]


def test_pcw_ties_prefer_earlier_layers():
    cache = SliceCache(4, SIZES, 3, 4)
    counts = np.array([[0, 2, 0, 0], [0, 0, 2, 0], [2, 0, 0, 0]])
    apply_warmup("pcw", cache, counts, "MSB", np.random.default_rng(0))
    assert cache.contents() == {(0, 1, "MSB"), (1, 2, "MSB")}


def test_unknown_warmup_names_the_field():
    with pytest.raises(ValueError, match="policy.warmup"):
        apply_warmup("hot", prefilled_cache(), COUNTS, "MSB", np.random.default_rng(0))
