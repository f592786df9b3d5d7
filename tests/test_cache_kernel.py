"""The Triton layer step (slicemoe.kernels.cache_step) against the PyTorch one it speeds up
(slicemoe.tensorcache.layer_step): the same random states and requests, identical results and
states. Runs on CUDA, or on the CPU through Triton's interpreter; skipped where Triton is absent
(CPU installs), the GPU benchmark runs it there."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from slicemoe.cache import tensor as tc  # noqa: E402
from slicemoe.cache import kernel as cache_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS, EXPERTS, K, M = 3, 6, 3, 4
CASES = [
    # (eviction, sliced, nested, lsb_fetch, prefetch_lsb, cold, ahead)
    ("lru", True, True, True, False, False, True),
    ("lru", True, True, False, True, False, True),
    ("fifo", True, True, True, True, True, True),
    ("lfu", True, True, True, True, False, True),
    ("lfu", True, True, False, False, True, False),
    ("lru", True, False, True, True, False, True),
    ("lfu", True, False, True, False, True, True),
    ("fifo", False, True, True, False, False, True),
    ("lru", False, True, True, False, True, False),
]


def states(spec, rows, g):
    """A random reachable state: random requests, of the kinds `spec`'s runs hold, from empty."""
    kinds = [tc.MSB, tc.LSB] if spec.nested else [tc.MSB, tc.FULL]
    kinds = torch.tensor(kinds if spec.sliced else [tc.FULL])
    st = tc.empty(spec, rows, DEVICE)
    for _ in range(25):
        kind = kinds[torch.randint(0, len(kinds), (rows,), generator=g)].to(DEVICE)
        j = tc.slot(
            spec, kind, torch.randint(0, LAYERS, (rows,), generator=g).to(DEVICE),
            torch.randint(0, EXPERTS, (rows,), generator=g).to(DEVICE),
        )  # fmt: skip
        on = (torch.rand(rows, generator=g) < 0.8).to(DEVICE)
        tc.request(st, spec, on, kind, j)
    return st


def clone(st):
    return tc.CacheState(*(t.clone() for t in (st.key, st.prefetched, st.used, st.clock, st.stats)))


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_the_kernel_gives_the_reference_layer_step(case):
    eviction, sliced, nested, lsb_fetch, prefetch_lsb, cold, ahead = case
    g = torch.Generator().manual_seed(len(str(case)))
    sizes = (5, 4, 9)
    rows = 7
    for capacity in (9, 41):
        spec = tc.Spec(
            LAYERS, EXPERTS, sizes, capacity, eviction, sliced, nested, lsb_fetch,
            low_bytes=5, prefetch_lsb=prefetch_lsb, prefetch_cold=cold,
        )  # fmt: skip
        base = states(spec, rows, g)
        for layer in range(2):  # layer 0 counts the resident experts
            idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:K] for _ in range(rows)])
            high = torch.rand(rows, K, generator=g) < 0.5
            on = torch.rand(rows, generator=g) < 0.85
            args = [idx, high, on]
            if ahead:
                experts = torch.stack(
                    [torch.randperm(EXPERTS, generator=g)[:M] for _ in range(rows)]
                )
                crit = torch.rand(rows, M, generator=g) < 0.5
                predicted = torch.rand(rows, generator=g) < 0.7
                aside = (
                    (layer + 1) % LAYERS,
                    experts.to(DEVICE),
                    crit.to(DEVICE),
                    predicted.to(DEVICE),
                )
            else:
                aside = None
            args = [a.to(DEVICE) for a in args]
            want_st, got_st = clone(base), clone(base)
            want = tc.layer_step(want_st, spec, layer, *args, aside)
            got = cache_step.layer_step(got_st, spec, layer, *args, aside)
            for w, o in zip(want, got):
                if w is None:
                    assert o is None
                else:
                    assert torch.equal(w.cpu(), o.cpu()), (capacity, layer)
            for w, o in zip(
                (want_st.key, want_st.prefetched, want_st.used, want_st.clock, want_st.stats),
                (got_st.key, got_st.prefetched, got_st.used, got_st.clock, got_st.stats),
            ):
                assert torch.equal(w.cpu(), o.cpu()), (capacity, layer)
            base = want_st
