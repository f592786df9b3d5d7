"""The tensor caches (slicemoe.tensorcache) against SliceCache, the readable reference: the same
random request streams on B rows, every hit, byte and entry compared after every operation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slicemoe.cache import tensor as tc
from slicemoe.cache import KINDS, SliceCache

LAYERS, EXPERTS = 3, 5
SIZES = {"MSB": 5, "LSB": 4, "FULL": 9}


def spec_for(eviction, capacity):
    sizes = tuple(SIZES[k] for k in KINDS)
    return tc.Spec(LAYERS, EXPERTS, sizes, capacity, eviction)


def reference(capacity, eviction):
    c = SliceCache(capacity, SIZES, LAYERS, EXPERTS, eviction)
    c.counting = True
    return c


def assert_same(st, spec, caches):
    for b, c in enumerate(caches):
        assert tc.contents(st, spec, b) == c.contents(), b
        assert int(st.used[b]) == c.used
        got = st.stats[b]
        for kind in KINDS:
            assert int(got[tc.S[f"requests_{kind}"]]) == c.stats.requests[kind]
            assert int(got[tc.S[f"hits_{kind}"]]) == c.stats.hits[kind]
            assert int(got[tc.S[f"bytes_{kind}"]]) == c.stats.bytes_missed[kind]
        assert int(got[tc.S["prefetch_bytes"]]) == c.stats.prefetch_bytes
        assert int(got[tc.S["prefetch_used_bytes"]]) == c.stats.prefetch_used_bytes
        assert {tuple(k) for k in c.prefetched} == {
            k for k in tc.contents(st, spec, b) if st.prefetched[b, tc._slot_of(spec, k)]
        }
        assert (tc.resident(st, spec)[b].numpy() == c.resident).all()


def random_ops(rng, steps, rows):
    """Per step one operation for all rows, each row its own key and whether it takes part."""
    for _ in range(steps):
        op = rng.choice(["request", "request", "request", "insert", "prefetch"])
        kind = rng.integers(0, 3, rows)
        layer = rng.integers(0, LAYERS, rows)
        expert = rng.integers(0, EXPERTS, rows)
        on = rng.random(rows) < 0.85
        flag = bool(rng.random() < 0.3)  # fetch=False for requests, cold for inserts/prefetches
        yield op, kind, layer, expert, on, flag


def drive(st, spec, caches, ops):
    for op, kind, layer, expert, on, flag in ops:
        j = torch.from_numpy(tc.slot(spec, kind, layer, expert))
        kinds, mask = torch.from_numpy(kind), torch.from_numpy(on)
        if op == "request":
            got = tc.request(st, spec, mask, kinds, j, fetch=not flag)
            want = [
                c.request((int(l), int(e), KINDS[k]), fetch=not flag) if o else False
                for c, k, l, e, o in zip(caches, kind, layer, expert, on)
            ]
            assert got.tolist() == want
        elif op == "insert":
            tc.insert(st, spec, mask, kinds, j, cold=flag)
            for c, k, l, e, o in zip(caches, kind, layer, expert, on):
                if o:
                    c.insert((int(l), int(e), KINDS[k]), cold=flag)
        else:
            got = tc.prefetch(st, spec, mask, kinds, j, cold=flag)
            want = [
                c.prefetch((int(l), int(e), KINDS[k]), cold=flag) if o else 0
                for c, k, l, e, o in zip(caches, kind, layer, expert, on)
            ]
            assert got.tolist() == want
        assert_same(st, spec, caches)


@pytest.mark.parametrize("eviction", ["lru", "fifo", "lfu"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_streams_give_the_reference_hits_bytes_and_contents(eviction, seed):
    rng = np.random.default_rng(seed)
    rows = 6
    # From one slice to most of the 15 experts x 3 kinds; both pools under pressure.
    capacity = int(rng.integers(9, 80))
    spec = spec_for(eviction, capacity)
    caches = [reference(capacity, eviction) for _ in range(rows)]
    st = tc.empty(spec, rows, "cpu")
    drive(st, spec, caches, random_ops(rng, 300, rows))
    # The LSB pool was exercised, and evictions happened.
    assert sum(c.stats.requests["LSB"] for c in caches) > 50
    assert sum(c.stats.misses() for c in caches) > 100


@pytest.mark.parametrize("eviction", ["lru", "fifo", "lfu"])
def test_a_converted_cache_continues_exactly_where_the_reference_stands(eviction):
    """Prefill and warmup run on SliceCaches; decode continues on their tensor form."""
    rng = np.random.default_rng(7)
    rows, capacity = 4, 40
    spec = spec_for(eviction, capacity)
    caches = [reference(capacity, eviction) for _ in range(rows)]
    scratch = tc.empty(spec, rows, "cpu")
    drive(scratch, spec, caches, random_ops(rng, 120, rows))
    st = tc.from_slicecaches(spec, caches, "cpu")
    assert_same(st, spec, caches)
    drive(st, spec, caches, random_ops(rng, 200, rows))


def test_the_lsb_pool_is_emptied_before_any_msb_entry():
    spec = spec_for("lru", 18)
    st = tc.empty(spec, 1, "cpu")
    on = torch.ones(1, dtype=torch.bool)

    def req(kind, layer, expert):
        j = torch.tensor([tc.slot(spec, kind, layer, expert)])
        return bool(tc.request(st, spec, on, kind, j)[0])

    req(tc.MSB, 0, 0)
    req(tc.LSB, 0, 0)
    req(tc.MSB, 0, 1)  # 14 B held: the next MSB takes the LSB's room, not the oldest MSB's
    req(tc.MSB, 0, 2)
    assert tc.contents(st, spec, 0) == {(0, 0, "MSB"), (0, 1, "MSB"), (0, 2, "MSB")}
