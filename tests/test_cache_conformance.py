"""One cache contract, every implementation of slicemoe.cache: the same sequences, from the same
warm starts, through each, compared step by step with the reference (reference.SliceCache,
driven as the reference runtime drives it).

A sequence is what decoding asks of the caches of B devices: layer steps, each with k expert
calls per row (the MSB or FULL slice, then the LSB slice of a high-bit call under nested
slicing, each fetched on a miss or not as policy.on_miss says: slicemoe.device.expert_call)
and optionally the prefetch of the next layer's predicted experts. A warm start is what
prefill and warmup leave: requests, warm and cold inserts, prefetches and evictions on
reference caches, which every implementation starts from (and must leave unchanged).

An implementation joins by one entry in IMPLEMENTATIONS: the evictions it runs, the sequences
it can express, and what it observes after each step; it is compared with the reference on
what it observes:
- compiled (all but LFU and Belady): every request's hit and the resident experts after each step; it
  replays demand requests only, so no prefetching and on_miss=fetch only;
- tensor (LRU, FIFO, LFU), the PyTorch layer step: its outputs (calls served at high
  precision, calls dropped, demand, read and prefetched bytes, resident experts at layer 0),
  then contents, prefetch marks, bytes used and counters (hits and misses per kind) after
  every step;
- kernel (as tensor), the Triton layer step: the same, on CUDA or through Triton's interpreter
  on the CPU, which is slow: it runs each sequence's first steps, KERNEL_ROW_STEPS rows x steps.
Belady is the reference's alone (an oracle bound): tests/test_cache.py checks it.
"""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from slicemoe.cache import (  # noqa: E402
    EVICTION,
    KIND_CODE,
    KINDS,
    SliceCache,
    compiled,
    eviction_params,
    tensor,
)
from slicemoe.config import CacheConfig, PrefetchConfig  # noqa: E402
from slicemoe.device import DROPPED, HIGH, expert_call, fetch_ahead, slice_kinds  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LAYERS, EXPERTS = 3, 6
SIZES = {"MSB": 5, "LSB": 4, "FULL": 9}
LOW_BYTES = 3  # expert bytes a low-bit call reads
KERNEL_ROW_STEPS = None if torch.cuda.is_available() else 12  # the interpreter's share


@dataclass(frozen=True)
class Mode:
    """The runtime's slice rules: which slices a call requests and how prefetches enter."""

    sliced: bool = True  # MSB (+ LSB) slices, or whole experts (FULL)
    nested: bool = True  # MSB + LSB is the high-bit expert; else two copies, MSB and FULL
    on_miss: str = "fetch"  # policy.on_miss
    prefetch_lsb: bool = False  # prefetch.slices=critical
    prefetch_cold: bool = False  # prefetch.insert=lru

    def kinds(self) -> tuple[str, ...]:
        """The slice kinds its runs hold."""
        if not self.sliced:
            return ("FULL",)
        return ("MSB", "LSB") if self.nested else ("MSB", "FULL")


@dataclass
class Step:
    """One MoE layer step on every row."""

    layer: int
    experts: np.ndarray  # [B, k]
    high: np.ndarray  # [B, k] bool: the call asks for its high-bit path
    on: np.ndarray  # [B] bool: the row decodes this step
    ahead: tuple | None = None  # (target layer, experts [B, m], critical [B, m], on [B])
    droppable: np.ndarray | None = None  # [B, k] bool: on_miss=drop leaves the call out on a miss


@dataclass
class Case:
    name: str
    capacity: int
    steps: list[Step]
    warm: list[list[tuple]]  # per row: (WARM operation, key), in order
    mode: Mode = Mode()
    sizes: dict | None = None  # SIZES unless given
    final: set | None = None  # the reference's contents of row 0 at the end, any eviction

    def __post_init__(self):
        self.sizes = self.sizes or SIZES

    @property
    def rows(self) -> int:
        return len(self.warm)

    @property
    def prefetching(self) -> bool:
        return any(s.ahead is not None for s in self.steps)


WARM = {
    "request": lambda cache, key: cache.request(key),
    "insert": lambda cache, key: cache.insert(key),
    "insert cold": lambda cache, key: cache.insert(key, cold=True),
    "prefetch": lambda cache, key: cache.prefetch(key),
    "prefetch cold": lambda cache, key: cache.prefetch(key, cold=True),
    "evict": lambda cache, key: key in cache and cache.evict(key),
}


def warm_caches(case: Case, eviction: str) -> list[SliceCache]:
    """Row b's cache (seeded b) from its warm operations; the policy's default parameters."""
    params = eviction_params(CacheConfig(eviction=eviction))
    caches = [
        SliceCache(case.capacity, case.sizes, LAYERS, EXPERTS, eviction, params=params, seed=b)
        for b in range(case.rows)
    ]
    for cache, ops in zip(caches, case.warm):
        for op, key in ops:
            WARM[op](cache, key)
    return caches


# --- the implementations: each runs a case from its warm caches, observing per step and row ---


def counters(stats) -> dict:
    """reference.Stats under the names of tensor.STATS."""
    return {
        **{f"requests_{k}": stats.requests[k] for k in KINDS},
        **{f"hits_{k}": stats.hits[k] for k in KINDS},
        **{f"bytes_{k}": stats.bytes_missed[k] for k in KINDS},
        "activations": stats.activations,
        "prefetch_bytes": stats.prefetch_bytes,
        "prefetch_used_bytes": stats.prefetch_used_bytes,
    }


@dataclass(frozen=True)
class Footprint:
    """What device.expert_call reads of a slicemoe.device.Footprint."""

    sizes: dict
    low_bytes: int
    nested: bool


def run_reference(case: Case, caches: list[SliceCache], eviction: str) -> list[list[dict]]:
    """The reference runtime's layer step (Runtime._decode: device.expert_call per call, then
    _prefetch), row by row; the hits read from each cache's trace."""
    caches, mode = copy.deepcopy(caches), case.mode
    fp = Footprint(case.sizes, LOW_BYTES, mode.nested)
    prefetch = PrefetchConfig(
        slices="critical" if mode.prefetch_lsb else "msb",
        insert="lru" if mode.prefetch_cold else "mru",
    )
    seen = []
    for step in case.steps:
        rows = []
        for b, cache in enumerate(caches):
            obs = dict(hits=(), served=tuple(step.high[b]), missed=0, read=0, moved=0)
            obs["dropped"] = (False,) * len(step.high[b])
            if step.on[b]:
                cache.trace = []
                paths, missed, read = [], 0, 0
                droppable = np.zeros_like(step.high) if step.droppable is None else step.droppable
                for e, h, d in zip(step.experts[b], step.high[b], droppable[b]):
                    path, r, m = expert_call(
                        cache, fp, step.layer, int(e), mode.sliced, bool(h), mode.on_miss, bool(d)
                    )
                    paths.append(path)
                    missed += m
                    read += r
                obs.update(
                    hits=tuple(request[-1] for request in cache.trace),
                    served=tuple(p == HIGH for p in paths),
                    dropped=tuple(p == DROPPED for p in paths),
                    missed=missed,
                    read=read,
                )
                cache.trace = None
                obs["resident"] = int(cache.resident.sum())
                if step.ahead is not None and step.ahead[3][b]:
                    target, experts, crit, _ = step.ahead
                    obs["moved"] = fetch_ahead(
                        cache, target, experts[b], crit[b], prefetch, mode.sliced, mode.nested
                    )
            obs.update(
                contents=cache.contents(),
                prefetched=set(cache.prefetched),
                used=cache.used,
                stats=counters(cache.stats),
            )
            rows.append(obs)
        seen.append(rows)
    return seen


def run_compiled(case: Case, caches: list[SliceCache], eviction: str) -> list[list[dict]]:
    """Each row's requests in one replay, the resident experts marked after each step."""
    mode = case.mode
    seen = [[{"hits": ()} for _ in caches] for _ in case.steps]
    for b, cache in enumerate(caches):
        keys, ends, stepped = [], [], []
        for t, step in enumerate(case.steps):
            if step.on[b]:
                for e, h in zip(step.experts[b], step.high[b]):
                    kinds = slice_kinds(mode.sliced, mode.nested, bool(h))
                    keys += [(step.layer, int(e), KIND_CODE[k]) for k in kinds]
                ends.append(len(keys) - 1)
                stepped.append(t)
        if not keys:
            continue
        ids = compiled.key_ids(*zip(*keys), EXPERTS)
        hits, resident = compiled.replay_requests(cache, ids, np.array(ends), eviction)
        for t, start, end, held in zip(stepped, [0, *(e + 1 for e in ends)], ends, resident):
            seen[t][b] = {"hits": tuple(hits[start : end + 1].tolist()), "resident": int(held)}
    return seen


def run_layer_steps(layer_step, case: Case, caches, eviction: str) -> list[list[dict]]:
    """A tensor.layer_step (or one with its signature) per step on all rows at once."""
    mode = case.mode
    spec = tensor.Spec(
        LAYERS,
        EXPERTS,
        tuple(case.sizes[k] for k in KINDS),
        case.capacity,
        eviction,
        sliced=mode.sliced,
        nested=mode.nested,
        on_miss=mode.on_miss,
        low_bytes=LOW_BYTES,
        prefetch_lsb=mode.prefetch_lsb,
        prefetch_cold=mode.prefetch_cold,
    )
    st = tensor.from_slicecaches(spec, caches, DEVICE)

    def on_device(a):
        return torch.as_tensor(a, device=DEVICE)

    seen = []
    for step in case.steps:
        ahead = step.ahead and (step.ahead[0], *map(on_device, step.ahead[1:]))
        args = map(on_device, (step.experts, step.high, step.on))
        droppable = None if step.droppable is None else on_device(step.droppable)
        served, dropped, missed, read, moved, held = layer_step(
            st, spec, step.layer, *args, droppable, ahead
        )
        rows = []
        for b in range(case.rows):
            contents = tensor.contents(st, spec, b)
            marked = st.prefetched[b].cpu()
            obs = dict(
                served=tuple(served[b].tolist()),
                dropped=tuple(dropped[b].tolist()),
                missed=int(missed[b]),
                read=int(read[b]),
                moved=int(moved[b]),
                contents=contents,
                prefetched={
                    (la, e, k)
                    for la, e, k in contents
                    if marked[tensor.slot(spec, KIND_CODE[k], la, e)]
                },
                used=int(st.used[b]),
                stats=dict(zip(tensor.STATS, st.stats[b].tolist())),
            )
            if held is not None and step.on[b]:
                obs["resident"] = int(held[b])
            rows.append(obs)
        seen.append(rows)
    return seen


def run_tensor(case, caches, eviction):
    return run_layer_steps(tensor.layer_step, case, caches, eviction)


def run_kernel(case, caches, eviction):
    from slicemoe.cache import kernel

    return run_layer_steps(kernel.layer_step, case, caches, eviction)


@dataclass(frozen=True)
class Impl:
    name: str
    evictions: tuple[str, ...]
    run: Callable  # (case, warm caches, eviction) -> per step, per row, what it observed
    serves: Callable = lambda case: True  # the sequences it can express
    row_steps: int | None = None  # runs each sequence's first steps, this many rows x steps
    needs: str | None = None  # a module it needs that some installs lack

    def marks(self):
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return [pytest.mark.skip(reason=f"{self.needs} is not installed")]
        return []


IMPLEMENTATIONS = [
    Impl(
        "compiled",
        compiled.EVICTIONS,
        run_compiled,
        serves=lambda case: case.mode.on_miss == "fetch" and not case.prefetching,
    ),
    Impl("tensor", tensor.EVICTIONS, run_tensor),
    Impl("kernel", tensor.EVICTIONS, run_kernel, row_steps=KERNEL_ROW_STEPS, needs="triton"),
]


# --- the sequences -----------------------------------------------------------------------------


def step(layer: int, *calls, ahead=None) -> Step:
    """A layer step of one row: `calls` (expert, high[, droppable]), then the prefetch of
    `ahead` (target layer, [(expert, critical), ...]) when given."""
    experts, high = zip(*((c[0], c[1]) for c in calls))
    droppable = np.array([[len(c) > 2 and c[2] for c in calls]])
    one = np.ones(1, dtype=bool)
    if ahead is not None:
        target, picks = ahead
        e, c = zip(*picks)
        ahead = (target, np.array([e]), np.array([c]), one)
    return Step(layer, np.array([experts]), np.array([high]), one, ahead, droppable)


def msb(expert: int, layer: int = 0) -> tuple:
    return (layer, expert, "MSB")


def full(expert: int) -> tuple:
    return (0, expert, "FULL")


CLASSIC = [1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]  # the page references of Belady's anomaly
UNIT = {"MSB": 1, "LSB": 1, "FULL": 1}
UNSLICED = Mode(sliced=False)
BASE = Mode(nested=False)

HAND_WRITTEN = [
    *(
        Case(
            f"classic trace, room for {c}",
            c,
            [step(0, (e, False)) for e in CLASSIC],
            [[]],
            UNSLICED,
            UNIT,
        )
        for c in (3, 4)
    ),
    Case(
        "LSB pool emptied first, oldest first",
        10,
        [step(0, (0, True), (1, True)), step(0, (2, False))],
        [[]],
        sizes={"MSB": 3, "LSB": 2, "FULL": 5},
        final={msb(0), msb(1), msb(2)},
    ),
    Case(
        "room for one expert: an LSB pushes out what the next call needs",
        9,
        [step(0, (0, True)), step(0, (1, True)), step(0, (0, False))],
        [[]],
        final={msb(0)},
    ),
    Case(
        "two copies: a FULL copy takes two MSB slices' room, an expert holds both",
        24,
        [step(0, (0, False), (1, False), (2, False)), step(0, (0, True)), step(0, (3, True))],
        [[]],
        BASE,
        final={msb(2), full(0), full(3)},
    ),
    Case(
        "on_miss=skip_lsb: a held LSB serves the high path, a missing one is not fetched",
        30,
        [step(0, (1, True)), step(0, (2, True), (1, True))],
        [[("insert", (0, 1, "LSB"))]],
        Mode(on_miss="skip_lsb"),
        final={msb(1), (0, 1, "LSB"), msb(2)},
    ),
    Case(
        "on_miss=drop: a droppable call that misses is looked up and moves nothing",
        30,
        [step(0, (1, False, True), (2, False, True), (3, True)), step(0, (2, True, True))],
        [[("insert", msb(1))]],
        Mode(on_miss="drop"),
        final={msb(1), msb(3), (0, 3, "LSB")},
    ),
    Case(
        "on_miss=substitute: a held MSB serves a high-bit call whose LSB misses",
        30,
        [step(0, (1, True), (2, True))],
        [[("insert", msb(1))]],
        Mode(on_miss="substitute"),
        final={msb(1), msb(2), (0, 2, "LSB")},
    ),
    Case(
        "on_miss=substitute, two copies: a held low-bit copy serves when FULL misses",
        24,
        [step(0, (0, True), (1, True))],
        [[("insert", msb(0))]],
        Mode(nested=False, on_miss="substitute"),
        final={msb(0), full(1)},
    ),
    Case(
        "cold inserts enter at the evict-first end, the latest lowest",
        15,
        [step(0, (3, False)), step(0, (4, False))],
        [[("insert", msb(0)), ("insert cold", msb(1)), ("insert cold", msb(2))]],
        final={msb(0), msb(3), msb(4)},
    ),
    Case(
        "a key evicted and inserted again is as recent as its insertion",
        3,
        [step(0, (3, False))],
        [
            [
                ("request", full(0)),
                ("request", full(1)),
                ("request", full(2)),
                ("evict", full(0)),
                ("request", full(0)),
            ]
        ],
        UNSLICED,
        UNIT,
        final={full(0), full(2), full(3)},
    ),
    Case(
        "cold prefetches: evicted first, a held slice not refreshed, a used one counted",
        15,
        [
            step(0, (0, False), (1, False), ahead=(1, [(5, False)])),
            step(1, (5, False), ahead=(2, [(0, False)])),
            step(2, (1, False), ahead=(0, [(1, False), (0, False)])),
            step(0, (2, False), (3, False)),
        ],
        [[]],
        Mode(prefetch_cold=True),
    ),
    Case(
        "prefetches of critical experts: MSB slices, then LSB; a held slice refreshed",
        27,
        [
            step(0, (0, True), (1, False), ahead=(1, [(2, True), (3, False)])),
            step(1, (2, True), (4, True), ahead=(2, [(0, True), (1, False)])),
            step(2, (0, True), ahead=(0, [(0, False), (5, True)])),
            step(0, (3, False), (1, False)),
        ],
        [[("prefetch", msb(5, 1))]],
        Mode(prefetch_lsb=True),
    ),
]


def random_case(seed: int, mode: Mode, prefetching: bool, rows=3, steps=24, k=2, m=2) -> Case:
    """Rows with their own warm starts and calls, some rows idle in some steps, layer after
    layer; from room for one expert to about a third of all slices."""
    rng = np.random.default_rng(seed)
    kinds = mode.kinds()

    def key():
        return int(rng.integers(LAYERS)), int(rng.integers(EXPERTS)), str(rng.choice(kinds))

    def pick(n):
        return np.stack([rng.permutation(EXPERTS)[:n] for _ in range(rows)])

    warm = [[(str(rng.choice(list(WARM))), key()) for _ in range(12)] for _ in range(rows)]
    seq = []
    for t in range(steps):
        ahead = None
        if prefetching:
            ahead = ((t + 1) % LAYERS, pick(m), rng.random((rows, m)) < 0.5, rng.random(rows) < 0.7)
        high, on = rng.random((rows, k)) < 0.4, rng.random(rows) < 0.85
        droppable = rng.random((rows, k)) < 0.5 if mode.on_miss == "drop" else None
        seq.append(Step(t % LAYERS, pick(k), high, on, ahead, droppable))
    name = [("nested" if mode.nested else "base") if mode.sliced else "unsliced"]
    if mode.on_miss != "fetch":
        name.append(mode.on_miss)
    if prefetching:
        name.append("prefetch " + ("critical" if mode.prefetch_lsb else "msb"))
        name.append("cold" if mode.prefetch_cold else "warm")
    return Case(f"random {seed}, {' '.join(name)}", int(rng.integers(9, 60)), seq, warm, mode)


RANDOM = [
    random_case(0, Mode(), False),
    random_case(1, Mode(on_miss="skip_lsb", prefetch_lsb=True), True),
    random_case(2, Mode(prefetch_lsb=True, prefetch_cold=True), True),
    random_case(3, Mode(on_miss="drop"), True),
    random_case(4, BASE, False),
    random_case(
        20, Mode(nested=False, on_miss="substitute", prefetch_lsb=True, prefetch_cold=True), True
    ),
    random_case(6, UNSLICED, False),
    random_case(7, Mode(sliced=False, on_miss="drop", prefetch_cold=True), True),
    random_case(26, Mode(on_miss="substitute"), False, rows=2, steps=12),
    # long enough for ghost lists, histories and heaps to fill and be used
    random_case(8, Mode(), False, steps=160),
    random_case(9, BASE, False, steps=160),
]
CASES = HAND_WRITTEN + RANDOM


# --- the tests -----------------------------------------------------------------------------------


def runs():
    for impl in IMPLEMENTATIONS:
        for eviction in impl.evictions:
            for case in filter(impl.serves, CASES):
                name = f"{impl.name}-{eviction}-{case.name}"
                yield pytest.param(impl, eviction, case, marks=impl.marks(), id=name)


@pytest.mark.parametrize("impl,eviction,case", list(runs()))
def test_an_implementation_observes_what_the_reference_does(impl, eviction, case):
    case = copy.copy(case)
    if impl.row_steps:
        case.steps = case.steps[: impl.row_steps // case.rows]
    caches = warm_caches(case, eviction)
    want = run_reference(case, caches, eviction)
    got = impl.run(case, caches, eviction)
    assert run_reference(case, caches, eviction) == want, "the warm caches were changed"
    assert len(got) == len(want)
    for t, (want_rows, got_rows) in enumerate(zip(want, got)):
        for b, (w, g) in enumerate(zip(want_rows, got_rows)):
            compared = w.keys() & g.keys()
            assert compared & {"hits", "stats"}, "nothing that tells hits from misses"
            for name in compared:
                assert g[name] == w[name], f"step {t}, row {b}: {name}"


@pytest.mark.parametrize("eviction", ["lru", "fifo", "lfu"])
@pytest.mark.parametrize("case", [c for c in HAND_WRITTEN if c.final], ids=lambda c: c.name)
def test_a_hand_written_case_ends_as_written(case, eviction):
    seen = run_reference(case, warm_caches(case, eviction), eviction)
    assert seen[-1][0]["contents"] == case.final


def test_the_sequences_put_every_pool_under_pressure():
    """Hits and misses of every kind, and prefetched slices used and evicted unused."""
    totals = dict.fromkeys(tensor.STATS, 0)
    for eviction in ("lru", "lfu"):
        for case in CASES:
            for row in run_reference(case, warm_caches(case, eviction), eviction)[-1]:
                for name, n in row["stats"].items():
                    totals[name] += n
    for kind in KINDS:
        assert 0 < totals[f"hits_{kind}"] < totals[f"requests_{kind}"], kind
    assert 0 < totals["prefetch_used_bytes"] < totals["prefetch_bytes"]
    assert sum(totals[f"requests_{k}"] for k in KINDS) > 1000


@pytest.mark.parametrize(
    "impl,eviction",
    [
        pytest.param(impl, e, marks=impl.marks(), id=f"{impl.name}-{e}")
        for impl in IMPLEMENTATIONS
        for e in EVICTION
        if e not in impl.evictions
    ],
)
def test_an_implementation_refuses_the_evictions_it_does_not_declare(impl, eviction):
    case = HAND_WRITTEN[0]
    caches = [SliceCache(case.capacity, case.sizes, LAYERS, EXPERTS, "lru")]
    with pytest.raises(ValueError, match=eviction):
        impl.run(case, caches, eviction)
