"""tensor.layer_step as one kernel launch: one program per simulated device.

A layer step is a short chain of dependent cache operations per device (each request may evict
what the next one would hit), so a program walks its row's requests in order, exactly as the
reference does: scalar loads and stores of single entries, and a block-wide minimum over a pool
for each eviction. Rows are independent, so B programs run at once. Counters and the row's bytes
and clock stay in registers until the end. Barriers separate a store from later loads of the
same entries by other threads of the program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slicemoe.cache.tensor import (
    ABSENT,
    EVICTIONS,
    LFU_COUNT,
    LFU_STAMP,
    STATS,
    CacheState,
    S,
    Spec,
)
from slicemoe.device import ON_MISS

_NSTATS = triton.next_power_of_2(len(STATS))
# Triton kernels read module constants only as constexpr.
_ABSENT = tl.constexpr(ABSENT)
_LFU_COUNT = tl.constexpr(LFU_COUNT)
_LFU_STAMP = tl.constexpr(LFU_STAMP)


@triton.jit
def _size(kind, s_msb, s_lsb, s_full):
    return tl.where(kind == 0, s_msb, tl.where(kind == 1, s_lsb, s_full)).to(tl.int64)


@triton.jit
def _pool_min(row, start, N: tl.constexpr, BLOCK: tl.constexpr):
    """(smallest key, its entry) among entries start .. start + N of a row."""
    best = tl.full((), _ABSENT, tl.int64)
    arg = tl.full((), -1, tl.int64)
    for c in range(0, N, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        k = tl.load(row + start + offs, mask=offs < N, other=_ABSENT)
        m = tl.min(k, axis=0)
        a = tl.argmin(k, axis=0).to(tl.int64)
        better = m < best
        arg = tl.where(better, start + c + a, arg)
        best = tl.where(better, m, best)
    return best, arg


@triton.jit
def _make_room(row, prow, used, nbytes, capacity, s_msb, s_lsb, s_full,
               N: tl.constexpr, BLOCK: tl.constexpr, HAS_MSB: tl.constexpr,
               HAS_LSB: tl.constexpr, HAS_FULL: tl.constexpr, MAX_EVICT: tl.constexpr):  # fmt: skip
    for _ in range(MAX_EVICT):
        if used + nbytes > capacity:
            tl.debug_barrier()
            best = tl.full((), _ABSENT, tl.int64)
            arg = tl.full((), -1, tl.int64)
            if HAS_LSB:
                best, arg = _pool_min(row, N, N, BLOCK)
            if best == _ABSENT:  # the LSB pool is empty: the main pool gives up its victim
                if HAS_MSB:
                    best, arg = _pool_min(row, 0, N, BLOCK)
                if HAS_FULL:
                    fb, fa = _pool_min(row, 2 * N, N, BLOCK)
                    arg = tl.where(fb < best, fa, arg)
                    best = tl.where(fb < best, fb, best)
            if best != _ABSENT:
                tl.store(row + arg, _ABSENT)
                tl.store(prow + arg, 0)
                used -= _size(arg // N, s_msb, s_lsb, s_full)
    return used


@triton.jit
def _touch(row, j, kv, clock, EVICTION: tl.constexpr):
    if EVICTION == 0:  # lru: the most recent
        clock += 1
        tl.store(row + j, clock)
    elif EVICTION == 2:  # lfu: one more use
        clock += 1
        tl.store(row + j, (kv // _LFU_COUNT + 1) * _LFU_COUNT + clock + _LFU_STAMP)
    return clock


@triton.jit
def _insert(row, prow, j, kind, cold, used, clock, capacity, s_msb, s_lsb, s_full,
            N: tl.constexpr, BLOCK: tl.constexpr, HAS_MSB: tl.constexpr, HAS_LSB: tl.constexpr,
            HAS_FULL: tl.constexpr, MAX_EVICT: tl.constexpr, EVICTION: tl.constexpr):  # fmt: skip
    nbytes = _size(kind, s_msb, s_lsb, s_full)
    used = _make_room(row, prow, used, nbytes, capacity, s_msb, s_lsb, s_full,
                      N, BLOCK, HAS_MSB, HAS_LSB, HAS_FULL, MAX_EVICT)  # fmt: skip
    clock += 1
    stamp = tl.where(cold, -clock, clock)
    if EVICTION == 2:
        stamp = stamp + tl.where(cold, 0, _LFU_COUNT) + _LFU_STAMP
    tl.store(row + j, stamp)
    return used + nbytes, clock


@triton.jit
def _request(row, prow, j, kind, fetch, used, clock, st, so, capacity,
             s_msb, s_lsb, s_full, N: tl.constexpr, BLOCK: tl.constexpr, HAS_MSB: tl.constexpr,
             HAS_LSB: tl.constexpr, HAS_FULL: tl.constexpr, MAX_EVICT: tl.constexpr,
             EVICTION: tl.constexpr, S_REQ: tl.constexpr, S_HIT: tl.constexpr,
             S_BYTES: tl.constexpr, S_USED: tl.constexpr):  # fmt: skip
    tl.debug_barrier()
    kv = tl.load(row + j)
    hit = kv != _ABSENT
    nbytes = _size(kind, s_msb, s_lsb, s_full)
    if hit:
        clock = _touch(row, j, kv, clock, EVICTION)
        if tl.load(prow + j) != 0:
            tl.store(prow + j, 0)
            st += tl.where(so == S_USED, nbytes, 0)
    else:
        if fetch:
            used, clock = _insert(row, prow, j, kind, False, used, clock, capacity, s_msb,
                                  s_lsb, s_full, N, BLOCK, HAS_MSB, HAS_LSB, HAS_FULL,
                                  MAX_EVICT, EVICTION)  # fmt: skip
            st += tl.where(so == S_BYTES + kind, nbytes, 0)
    st += tl.where(so == S_REQ + kind, 1, 0)
    st += tl.where((so == S_HIT + kind) & hit, 1, 0)
    return hit, used, clock, st


@triton.jit
def _prefetch(row, prow, j, kind, used, clock, st, so, capacity, s_msb, s_lsb, s_full,
              N: tl.constexpr, BLOCK: tl.constexpr, HAS_MSB: tl.constexpr,
              HAS_LSB: tl.constexpr, HAS_FULL: tl.constexpr, MAX_EVICT: tl.constexpr,
              EVICTION: tl.constexpr, COLD: tl.constexpr, S_PREF: tl.constexpr):  # fmt: skip
    tl.debug_barrier()
    kv = tl.load(row + j)
    moved = tl.full((), 0, tl.int64)
    if kv != _ABSENT:
        if not COLD:
            clock = _touch(row, j, kv, clock, EVICTION)
    else:
        used, clock = _insert(row, prow, j, kind, COLD, used, clock, capacity, s_msb, s_lsb,
                              s_full, N, BLOCK, HAS_MSB, HAS_LSB, HAS_FULL, MAX_EVICT,
                              EVICTION)  # fmt: skip
        tl.store(prow + j, 1)
        moved = _size(kind, s_msb, s_lsb, s_full)
    st += tl.where(so == S_PREF, moved, 0)
    return moved, used, clock, st


@triton.jit
def _first_kind(high, SLICED: tl.constexpr, NESTED: tl.constexpr):
    """tensor._first_kind: MSB (0) sliced, FULL (2) unsliced, either for base."""
    kind = tl.where(high, 2, 0).to(tl.int64)
    if SLICED and NESTED:
        kind = tl.full((), 0, tl.int64)
    if not SLICED:
        kind = tl.full((), 2, tl.int64)
    return kind


# One build for every layer and cache capacity: unspecialised 64-bit scalars, so that neither
# a value (Triton specialises 1 and multiples of 16) nor a capacity past 2^31 bytes asks for
# another compile in a pass. The slot count N (MoE layers x experts) stays a constant.
_SCALARS = ["layer", "target", "capacity", "s_msb", "s_lsb", "s_full", "low_bytes"]


@triton.jit(do_not_specialize=_SCALARS)
def _layer_step(key_ptr, pref_ptr, used_ptr, clock_ptr, stats_ptr, idx_ptr, high_ptr, on_ptr,
                drop_ptr, ahead_e_ptr, ahead_c_ptr, ahead_on_ptr, served_ptr, dropped_ptr, out_ptr,
                layer: tl.int64, target: tl.int64, capacity: tl.int64, s_msb: tl.int64,
                s_lsb: tl.int64, s_full: tl.int64, low_bytes: tl.int64,
                N: tl.constexpr, E: tl.constexpr, K: tl.constexpr, M: tl.constexpr,
                EVICTION: tl.constexpr, SLICED: tl.constexpr, NESTED: tl.constexpr,
                ON_MISS: tl.constexpr, PREFETCH_LSB: tl.constexpr, COLD: tl.constexpr,
                AHEAD: tl.constexpr, MAX_EVICT: tl.constexpr, BLOCK: tl.constexpr,
                NSTATS: tl.constexpr, NCOLS: tl.constexpr, S_REQ: tl.constexpr, S_HIT: tl.constexpr,
                S_BYTES: tl.constexpr, S_ACT: tl.constexpr, S_PREF: tl.constexpr,
                S_USED: tl.constexpr):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    row = key_ptr + b * 3 * N
    prow = pref_ptr + b * 3 * N
    HAS_MSB: tl.constexpr = SLICED
    HAS_LSB: tl.constexpr = SLICED and NESTED
    HAS_FULL: tl.constexpr = not (SLICED and NESTED)
    used = tl.load(used_ptr + b)
    clock = tl.load(clock_ptr + b)
    so = tl.arange(0, NSTATS)
    st = tl.zeros([NSTATS], tl.int64)
    missed = tl.full((), 0, tl.int64)
    read = tl.full((), 0, tl.int64)
    moved = tl.full((), 0, tl.int64)
    held = tl.full((), 0, tl.int64)
    if tl.load(on_ptr + b) != 0:
        for j in range(K):
            e = tl.load(idx_ptr + b * K + j).to(tl.int64)
            h = tl.load(high_ptr + b * K + j) != 0
            st += tl.where(so == S_ACT, 1, 0)
            first = _first_kind(h, SLICED, NESTED)
            # What expert_call decides from the slices held before the call (policy.on_miss:
            # 0 fetch, 1 skip_lsb, 2 drop, 3 substitute).
            tl.debug_barrier()
            miss = tl.load(row + first * N + layer * E + e) == _ABSENT
            if HAS_LSB:
                miss = miss | (h & (tl.load(row + N + layer * E + e) == _ABSENT))
            drop = tl.full((), 0, tl.int1)
            sub = tl.full((), 0, tl.int1)
            if ON_MISS == 2:
                drop = miss & (tl.load(drop_ptr + b * K + j) != 0)
            if ON_MISS == 3 and SLICED:
                sub = h & miss & (tl.load(row + layer * E + e) != _ABSENT)
            fetch = (drop | sub) == 0
            hit, used, clock, st = _request(row, prow, first * N + layer * E + e, first, fetch,
                                            used, clock, st, so, capacity, s_msb, s_lsb, s_full,
                                            N, BLOCK, HAS_MSB, HAS_LSB, HAS_FULL, MAX_EVICT,
                                            EVICTION, S_REQ, S_HIT, S_BYTES, S_USED)  # fmt: skip
            if fetch & (hit == 0):
                missed += _size(first, s_msb, s_lsb, s_full)
            high_path = (first == 2) & (hit | fetch)
            if HAS_LSB:
                if h:
                    fetch_lsb = fetch & (ON_MISS != 1)
                    lsb, used, clock, st = _request(row, prow, N + layer * E + e, 1, fetch_lsb,
                                                    used, clock, st, so, capacity, s_msb, s_lsb,
                                                    s_full, N, BLOCK, HAS_MSB, HAS_LSB, HAS_FULL,
                                                    MAX_EVICT, EVICTION, S_REQ, S_HIT, S_BYTES,
                                                    S_USED)  # fmt: skip
                    high_path = (lsb | fetch_lsb) & (drop == 0)
                    if fetch_lsb & (lsb == 0):
                        missed += s_lsb
            elif ON_MISS == 3 and SLICED:
                if sub:  # base: the high-bit copy was looked up, the low-bit one serves
                    _, used, clock, st = _request(row, prow, layer * E + e, 0, False, used,
                                                  clock, st, so, capacity, s_msb, s_lsb, s_full,
                                                  N, BLOCK, HAS_MSB, HAS_LSB, HAS_FULL,
                                                  MAX_EVICT, EVICTION, S_REQ, S_HIT, S_BYTES,
                                                  S_USED)  # fmt: skip
            read += tl.where(drop, 0, tl.where(high_path, s_full, low_bytes))
            tl.store(served_ptr + b * K + j, high_path.to(tl.int8))
            tl.store(dropped_ptr + b * K + j, drop.to(tl.int8))
        if layer == 0:
            tl.debug_barrier()
            for c in range(0, N, BLOCK):
                offs = c + tl.arange(0, BLOCK)
                inside = offs < N
                msb = tl.load(row + offs, mask=inside, other=_ABSENT) != _ABSENT
                full = tl.load(row + 2 * N + offs, mask=inside, other=_ABSENT) != _ABSENT
                held += tl.sum((msb | full).to(tl.int64), axis=0)
        if AHEAD:
            if tl.load(ahead_on_ptr + b) != 0:
                for j in range(M):
                    e = tl.load(ahead_e_ptr + b * M + j).to(tl.int64)
                    c = tl.load(ahead_c_ptr + b * M + j) != 0
                    first = _first_kind(c & PREFETCH_LSB, SLICED, NESTED)
                    got, used, clock, st = _prefetch(row, prow, first * N + target * E + e, first,
                                                     used, clock, st, so, capacity, s_msb, s_lsb,
                                                     s_full, N, BLOCK, HAS_MSB, HAS_LSB, HAS_FULL,
                                                     MAX_EVICT, EVICTION, COLD,
                                                     S_PREF)  # fmt: skip
                    moved += got
                if HAS_LSB and PREFETCH_LSB:
                    for j in range(M):
                        e = tl.load(ahead_e_ptr + b * M + j).to(tl.int64)
                        if tl.load(ahead_c_ptr + b * M + j) != 0:
                            got, used, clock, st = _prefetch(row, prow, N + target * E + e, 1,
                                                             used, clock, st, so, capacity,
                                                             s_msb, s_lsb, s_full, N, BLOCK,
                                                             HAS_MSB, HAS_LSB, HAS_FULL,
                                                             MAX_EVICT, EVICTION, COLD,
                                                             S_PREF)  # fmt: skip
                            moved += got
    else:
        for j in range(K):
            tl.store(served_ptr + b * K + j, tl.load(high_ptr + b * K + j))
            tl.store(dropped_ptr + b * K + j, tl.full((), 0, tl.int8))
    tl.store(used_ptr + b, used)
    tl.store(clock_ptr + b, clock)
    stats = stats_ptr + b * NCOLS + so
    tl.store(stats, tl.load(stats, mask=so < NCOLS) + st, mask=so < NCOLS)
    tl.store(out_ptr + b * 4 + 0, missed)
    tl.store(out_ptr + b * 4 + 1, read)
    tl.store(out_ptr + b * 4 + 2, moved)
    tl.store(out_ptr + b * 4 + 3, held)


def layer_step(st: CacheState, spec: Spec, layer: int, idx, high, on, droppable=None, ahead=None):
    """tensor.layer_step, same arguments and results, in one launch."""
    rows, k = idx.shape
    served = torch.empty((rows, k), dtype=torch.bool, device=idx.device)
    dropped = torch.empty((rows, k), dtype=torch.bool, device=idx.device)
    out = torch.empty((rows, 4), dtype=torch.int64, device=idx.device)
    if droppable is None:  # not read
        droppable = high
    if ahead is None:  # the prefetch arguments are not read
        target, experts, crit, predicted = 0, idx, high, on
    else:
        target, experts, crit, predicted = ahead
    u8 = torch.uint8
    _layer_step[(rows,)](
        st.key, st.prefetched.view(u8), st.used, st.clock, st.stats,
        idx, high.view(u8), on.view(u8), droppable.view(u8),
        experts, crit.view(u8), predicted.view(u8), served.view(u8), dropped.view(u8), out,
        layer, target, spec.capacity, *spec.sizes, spec.low_bytes,
        N=spec.n, E=spec.experts, K=k, M=experts.shape[1],
        EVICTION=EVICTIONS.index(spec.eviction), SLICED=spec.sliced, NESTED=spec.nested,
        ON_MISS=ON_MISS.index(spec.on_miss), PREFETCH_LSB=spec.prefetch_lsb,
        COLD=spec.prefetch_cold, AHEAD=ahead is not None, MAX_EVICT=spec.max_evictions,
        BLOCK=min(1024, triton.next_power_of_2(spec.n)), NSTATS=_NSTATS, NCOLS=len(STATS),
        S_REQ=S["requests_MSB"], S_HIT=S["hits_MSB"], S_BYTES=S["bytes_MSB"],
        S_ACT=S["activations"], S_PREF=S["prefetch_bytes"], S_USED=S["prefetch_used_bytes"],
        num_warps=1,
    )  # fmt: skip
    held = out[:, 3] if layer == 0 else None
    return served, dropped, out[:, 0], out[:, 1], out[:, 2], held
