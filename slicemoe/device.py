"""The simulated device: what one MoE layer step asks of its slice cache, and what it is billed.

A device is an XPU with DRAM, where the slice cache lives (slicemoe.cache), and Flash, where
every expert is (DESIGN.md sections 4 to 6). Its rules, shared by the in-loop runtimes
(slicemoe.runtime, slicemoe.tensor_runtime) and the replay (slicemoe.replay):
- requests: which slices an expert call asks for (`slice_kinds`), whether it then computes on
  the high-bit path (`computes_high`), one call through a cache under policy.on_miss
  (`expert_call`), how a prompt streams through it (`prefill_cost`) and which slices a
  prefetch fetches (`fetch_ahead`; what to prefetch is slicemoe.prefetch's);
- bills: the operations and DRAM and Flash bytes of a prefill, a decode layer step and the LM
  head, from the model's `Footprint`, which slicemoe.hardware.charge turns into energy and
  latency. Bills take scalars, numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from slicemoe import quant
from slicemoe.config import BitsConfig, HardwareConfig, PrefetchConfig
from slicemoe.hardware import Cost, charge
from slicemoe.models import Dims, Shape
from slicemoe.warmup import apply_warmup


@dataclass(frozen=True)
class Footprint:
    """Per-layer bytes and operations the hardware model charges (weights as stored)."""

    shape: Shape
    sizes: dict  # slice kind -> bytes (FULL = high-bit expert)
    low_bytes: int  # bytes an expert computed on the low path reads (its MSB slice)
    # True when the low path is the MSB slice of the high-bit code (amat, trunc); False for
    # `base`, whose low-bit experts are a second, independent copy (cached and fetched whole).
    nested: bool
    expert_op_cost: float  # INT8-MAC equivalents of one expert MAC (fp16 experts cost more)
    dense_op_cost: float
    dense_params: int  # non-expert params per MoE layer (attention, shared expert, norms)
    dense_bytes: int
    head_params: int  # embedding read + LM head, once per token
    head_bytes: int
    kv_bytes_per_token: float  # K and V at kv_bits (MLA: the compressed latent), see Dims
    attn_dim: float  # heads x head_dim, for the attention-score operations
    window_kv_bytes_per_token: float  # the same for sliding-window layers ...
    window_attn_dim: float
    window: int  # ... which attend to at most this many tokens


def footprint(dims: Dims, shape: Shape, bits: BitsConfig, hw: HardwareConfig) -> Footprint:
    sizes = quant.slice_bytes(
        shape.expert_params, bits.high, bits.low, bits.group, bits.symmetric, shape.expert_bias
    )
    dense_w = (bits.nonexpert_bits or 16) / 8
    fp16 = hw.fp16_op_cost
    return Footprint(
        shape=shape,
        sizes=sizes,
        low_bytes=sizes["MSB"] if bits.low is not None else sizes["FULL"],
        nested=bits.scheme != "base",
        expert_op_cost=fp16 if bits.high is None else 1.0,
        dense_op_cost=fp16 if bits.nonexpert_bits is None else 1.0,
        dense_params=dims.dense_params,
        dense_bytes=int(dims.dense_params * dense_w),
        head_params=dims.head_params,
        head_bytes=int(dims.head_params * dense_w),
        kv_bytes_per_token=dims.kv_values * hw.kv_bits / 8,
        attn_dim=dims.attn_dim,
        window_kv_bytes_per_token=dims.window_kv_values * hw.kv_bits / 8,
        window_attn_dim=dims.window_attn_dim,
        window=dims.window,
    )


# --- requests: what an expert call, a prompt and a prefetch ask of the cache --------------------


def is_sliced(precision: str) -> bool:
    """Whether a precision policy uses the low path, so that experts are cached as slices."""
    return precision in ("low", "dbsc")


def slice_kinds(sliced: bool, nested: bool, high: bool) -> tuple[str, ...]:
    """The slices an expert call requests, on the high-bit (`high`) or the low-bit path."""
    if not sliced:
        return ("FULL",)
    if not nested:
        return ("FULL",) if high else ("MSB",)
    return ("MSB", "LSB") if high else ("MSB",)


def computes_high(kinds: tuple[str, ...]) -> bool:
    """Whether a call that requested `kinds` runs on the high-bit path once they are all
    served: a whole high-bit copy (FULL), or MSB + LSB."""
    return "MSB" not in kinds or len(kinds) == 2


# policy.on_miss: what a decode expert call does when a slice it requests is not in DRAM.
ON_MISS = ("fetch", "skip_lsb", "drop", "substitute")
# How an expert call computes: on the high-bit path, the low-bit one, or not at all.
HIGH, LOW, DROPPED = "high", "low", "dropped"


def expert_call(
    cache, fp: Footprint, layer: int, expert: int, sliced: bool, high: bool,
    on_miss: str = "fetch", droppable: bool = False,
):  # fmt: skip
    """One decode expert call, on its high-bit path if `high`, through `cache` under `on_miss`
    (docs/simulator.md): (how it computes, HIGH, LOW or DROPPED; the expert bytes it reads from
    DRAM; the bytes it fetched from Flash). `droppable`: `drop` may leave it out on a miss.
    Every slice it looks up is a request, counted whether fetched or not."""

    def held(kinds) -> bool:
        return all((layer, expert, k) in cache for k in kinds)

    kinds, low = slice_kinds(sliced, fp.nested, high), slice_kinds(sliced, fp.nested, False)
    path = HIGH if computes_high(kinds) else LOW
    fetch = [on_miss != "skip_lsb" or k != "LSB" for k in kinds]
    if on_miss == "drop" and droppable and not held(kinds):
        fetch, path = [False] * len(kinds), DROPPED
    elif on_miss == "substitute" and kinds != low and not held(kinds) and held(low):
        # base: the high-bit copy is looked up, then the low-bit copy (kind MSB) serves
        kinds += tuple(k for k in low if k not in kinds)
        fetch, path = [False] * len(kinds), LOW
    hits = cache.access(layer, expert, kinds, fetch)
    if path == HIGH and not all(h or f for h, f in zip(hits, fetch)):
        path = LOW  # skip_lsb: the LSB slice stayed in Flash
    missed = sum(fp.sizes[k] for k, h, f in zip(kinds, hits, fetch) if f and not h)
    read = {HIGH: fp.sizes["FULL"], LOW: fp.low_bytes, DROPPED: 0}[path]
    return path, read, missed


def stream_prefill(cache, counts: np.ndarray, kinds, sizes: dict):
    """Prefill streams, layer by layer, every expert a layer used (in index order) through the
    device's cache: (distinct experts used [L], bytes missed [L]); `counts` [L, E]."""
    layers = len(counts)
    used, missed = np.zeros(layers), np.zeros(layers)
    for layer, row in enumerate(counts):
        experts = np.nonzero(row)[0]
        used[layer] = len(experts)
        for e in experts:
            hits = cache.access(layer, int(e), kinds)
            missed[layer] += sum(sizes[k] for k, h in zip(kinds, hits) if not h)
    return used, missed


def fetch_ahead(cache, layer: int, experts, crit, prefetch: PrefetchConfig, sliced, nested):
    """Prefetch the slices of `experts` of `layer` into `cache`: MSB (a whole expert when
    unsliced), plus LSB for `crit` ones under `prefetch.slices=critical`; the Flash bytes moved.
    MSB slices go first: an LSB fetched before them would be the first thing their room is made
    from (the LSB pool is emptied first)."""
    critical_lsb = prefetch.slices == "critical"
    slices = [
        (int(e), kind)
        for e, c in zip(experts, crit)
        for kind in slice_kinds(sliced, nested, bool(c) and critical_lsb)
    ]
    return sum(
        cache.prefetch((layer, e, kind), cold=prefetch.insert == "lru")
        for e, kind in sorted(slices, key=lambda s: s[1] == "LSB")
    )


# --- bills: (ops, DRAM bytes, Flash bytes[, of which prefetched]) per layer step ----------------


def _ops(fp: Footprint, tokens, experts, attn):
    return (
        2.0 * tokens * fp.dense_params * fp.dense_op_cost
        + 2.0 * experts * fp.shape.expert_params * fp.expert_op_cost
        + attn
    )


def _attended(fp: Footprint, dim_full, dim_window, tokens):
    """`dim` x the tokens a query attends to, over full and sliding-window layers."""
    window = (
        tokens.clamp(max=fp.window) if hasattr(tokens, "clamp") else np.minimum(tokens, fp.window)
    )
    return dim_full * tokens + dim_window * window


def prefill_bill(fp: Footprint, tokens, ctx, used, missed):
    """(ops, DRAM bytes, Flash bytes) of one MoE layer over `tokens` prompt tokens after `ctx`
    cached ones: `used` distinct experts read once at high precision, `missed` bytes fetched."""
    attn = 2.0 * tokens * _attended(fp, fp.attn_dim, fp.window_attn_dim, ctx + tokens)
    kv = tokens * (fp.kv_bytes_per_token + fp.window_kv_bytes_per_token)
    ops = _ops(fp, tokens, tokens * fp.shape.top_k, attn)
    return ops, fp.dense_bytes + used * fp.sizes["FULL"] + kv + missed, missed


def decode_bill(fp: Footprint, experts, ctx, read, missed, moved=0):
    """One MoE layer for one token after `ctx` cached ones: `experts` routed calls reading `read`
    expert bytes from DRAM, `missed` bytes fetched from Flash, and `moved` bytes prefetched for
    the next layer (Flash reads and DRAM fills, overlapping this layer)."""
    ops = _ops(fp, 1, experts, 4.0 * _attended(fp, fp.attn_dim, fp.window_attn_dim, ctx))
    kv = _attended(fp, fp.kv_bytes_per_token, fp.window_kv_bytes_per_token, ctx + 1)
    return ops, fp.dense_bytes + read + kv + missed + moved, missed + moved, moved


def head_bill(fp: Footprint, tokens):
    """Embedding + LM head for `tokens` tokens (weights read once)."""
    return 2.0 * fp.head_params * fp.dense_op_cost * tokens, fp.head_bytes, 0


def charge_all(hw: HardwareConfig, bill, shape) -> Cost:
    """The hardware cost of every layer step of `shape` (bill terms broadcast to it)."""
    return charge(hw, *(np.broadcast_to(np.asarray(x, float), shape) for x in bill))


def prefill_cost(fp: Footprint, hw: HardwareConfig, cache, counts, tokens: int, sliced) -> Cost:
    """One device's prefill of a `tokens`-token prompt whose layers used the experts `counts`
    [L, E]: they stream through `cache` at high precision; every MoE layer's bill and the LM
    head for the last token."""
    used, missed = stream_prefill(cache, counts, slice_kinds(sliced, fp.nested, True), fp.sizes)
    layers = charge_all(hw, prefill_bill(fp, tokens, 0, used, missed), used.shape)
    return layers.total() + charge(hw, *head_bill(fp, 1)).total()


def warm_up(fp: Footprint, hw: HardwareConfig, cache, counts, sliced, warmup: str, rng):
    """The named warmup (slicemoe.warmup) at the prefill -> decode switch, after prefill streamed
    its high-precision slices: (its cost, the bytes it read from Flash). The Flash reads fill
    DRAM outside any layer step: no operations."""
    streamed = slice_kinds(sliced, fp.nested, True)
    kind = "MSB" if sliced else "FULL"  # what makes an expert usable at low cost
    filled = apply_warmup(warmup, cache, counts, streamed, kind, rng)
    return charge(hw, 0.0, filled, filled), filled
