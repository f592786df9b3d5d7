"""Cache and hardware accounting replayed from a recorded request stream, without the model.

`replay(stream, cfg)` returns exactly the metrics `slicemoe.run.run(cfg)` computes with the
model in the loop, for any cache capacity, eviction (Belady included: the stream is its
future), warmup, measurement window and hardware profile, as long as `replayable(cfg)`: the
requests must not depend on the cache. The devices replay one after the other through the same
`SliceCache`, warmup functions and per-layer bills as the runtime, so there is one definition of
each rule.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from slicemoe.cache import SliceCache
from slicemoe.config import RunConfig
from slicemoe.hardware import Cost, charge
from slicemoe.metrics import COL, COUNTERS, KINDS, assemble
from slicemoe.models.adapter import (
    Footprint,
    decode_bill,
    footprint,
    head_bill,
    prefill_bill,
    slice_kinds,
)
from slicemoe.quant import reference_bytes
from slicemoe.stream import Stream, replayable, stream_key
from slicemoe.trace import write_trace
from slicemoe.validate import ConfigError, capacity_bytes, validate
from slicemoe.warmup import apply_warmup


def replay(stream: Stream, cfg: RunConfig) -> dict:
    """The metrics dict (and curves, and trace with cfg.trace) of `cfg` from `stream`."""
    t0 = time.time()
    validate(cfg)
    if not replayable(cfg):
        raise ValueError(
            "this config's requests depend on the cache (cache-aware routing, lsb_miss=skip or "
            "a miss-rate target): it cannot be replayed, run it with the model in the loop"
        )
    if stream_key(cfg) != stream.key:
        raise ValueError(
            f"the stream was recorded for stream key {stream.key}, this config has "
            f"{stream_key(cfg)}: they differ in model, bits, precision, task or batch settings"
        )
    fp = footprint(stream.dims, stream.shape, cfg.bits, cfg.hardware)
    capacity = capacity_bytes(cfg, stream.shape)
    steps = int(stream.decode_steps.max()) if stream.num_sequences else 0
    rows = np.zeros((steps, len(COUNTERS)))
    prefill, warmup_bytes, traces = Cost(), 0, []
    for s in range(stream.num_sequences):
        device = _Device(cfg, fp, capacity, stream, s)
        prefill = prefill + device.prefill()
        fills = device.warmup()
        prefill = prefill + _total(charge(cfg.hardware, 0.0, fills, fills))
        warmup_bytes += fills
        rows[: device.steps] += device.decode()
        if device.cache.trace is not None:
            traces.append(device.cache.trace)
    result = assemble(
        cfg,
        rows,
        prefill,
        warmup_bytes,
        int(stream.prompt_len.sum()),
        stream.scores,
        capacity,
        fp.sizes["FULL"],
        reference_bytes(stream.shape.expert_params),
    )
    result["trace_path"] = write_trace(cfg, traces) if cfg.trace else None
    result["wall_s"] = time.time() - t0
    return result


def _charge(hw, bill, shape) -> Cost:
    """The hardware cost of every layer step of `shape` (bill terms broadcast to it)."""
    return charge(hw, *(np.broadcast_to(np.asarray(x, float), shape) for x in bill))


def _total(cost: Cost) -> Cost:
    return Cost(*(float(np.sum(getattr(cost, f.name))) for f in dataclasses.fields(Cost)))


class _Device:
    """One recorded sequence on its own simulated device."""

    def __init__(self, cfg: RunConfig, fp: Footprint, capacity: int, stream: Stream, s: int):
        self.cfg, self.fp, self.s = cfg, fp, s
        self.prompt_len, self.counts, self.experts, self.high = stream.sequence(s)
        self.steps = len(self.experts)
        self.sliced = cfg.policy.precision in ("low", "dbsc")
        shape = stream.shape
        kinds = slice_kinds(self.sliced, fp.nested, True)
        future = None
        if cfg.cache.eviction == "belady":
            future = [k for k in self._requests(kinds) if k[2] != "LSB"]
        self.cache = SliceCache(
            capacity, fp.sizes, shape.num_moe_layers, shape.num_experts, cfg.cache.eviction, future
        )
        self.cache.counting = False
        self.cache.trace = [] if cfg.trace else None

    def _requests(self, prefill_kinds):
        """Every slice request of this device in order (the Belady oracle's future)."""
        for layer, row in enumerate(self.counts):
            for e in np.nonzero(row)[0]:
                yield from ((layer, int(e), k) for k in prefill_kinds)
        for t in range(self.steps):
            for layer in range(self.experts.shape[1]):
                for e, h in zip(self.experts[t, layer], self.high[t, layer]):
                    kinds = slice_kinds(self.sliced, self.fp.nested, bool(h))
                    yield from ((layer, int(e), k) for k in kinds)

    def prefill(self) -> Cost:
        fp, cache = self.fp, self.cache
        cache.tag = (self.s, "prefill", -1)
        kinds = slice_kinds(self.sliced, fp.nested, True)
        layers = len(self.counts)
        used, missed = np.zeros(layers), np.zeros(layers)
        for layer, row in enumerate(self.counts):
            experts = np.nonzero(row)[0]
            used[layer] = len(experts)
            for e in experts:
                hits = cache.access(layer, int(e), kinds)
                missed[layer] += sum(fp.sizes[k] for k, h in zip(kinds, hits) if not h)
        hw = self.cfg.hardware
        cost = _total(_charge(hw, prefill_bill(fp, self.prompt_len, 0, used, missed), (layers,)))
        return cost + _total(charge(hw, *head_bill(fp, 1)))

    def warmup(self) -> int:
        kind = "MSB" if self.sliced else "FULL"
        rng = np.random.default_rng([self.cfg.seed, self.s])
        return apply_warmup(self.cfg.policy.warmup, self.cache, self.counts, kind, rng)

    def decode(self) -> np.ndarray:
        """COUNTERS of each decode step of this device, [steps, COUNTERS]."""
        fp, cache, stats = self.fp, self.cache, self.cache.stats
        cache.counting = True
        layers = self.experts.shape[1]
        out = np.zeros((self.steps, len(COUNTERS)))
        read, missed = np.zeros((self.steps, layers)), np.zeros((self.steps, layers))
        for t in range(self.steps):
            cache.tag = (self.s, "decode", t)
            before = [(stats.requests[k], stats.hits[k]) for k in KINDS], stats.activations
            for layer in range(layers):
                for e, h in zip(self.experts[t, layer], self.high[t, layer]):
                    kinds = slice_kinds(self.sliced, fp.nested, bool(h))
                    hits = cache.access(layer, int(e), kinds)
                    missed[t, layer] += sum(fp.sizes[k] for k, hit in zip(kinds, hits) if not hit)
                    # With lsb_miss=fetch a requested high-bit path is always served.
                    read[t, layer] += fp.sizes["FULL"] if h or not self.sliced else fp.low_bytes
                if layer == 0:
                    out[t, COL["resident_sum"]] = cache.resident.sum()
            (counts, acts) = before
            for k, (req, hit) in zip(KINDS, counts):
                out[t, COL[f"requests_{k}"]] = stats.requests[k] - req
                out[t, COL[f"misses_{k}"]] = (stats.requests[k] - stats.hits[k]) - (req - hit)
            out[t, COL["activations"]] = stats.activations - acts
        k = self.experts.shape[2]
        high = self.high.sum((1, 2)) if self.sliced else np.full(self.steps, layers * k)
        out[:, COL["expert_calls"]] = layers * k
        out[:, COL["highbit_calls"]] = high
        out[:, COL["tokens"]] = 1
        hw = self.cfg.hardware
        ctx = (self.prompt_len + np.arange(self.steps))[:, None]
        layer_cost = _charge(hw, decode_bill(fp, k, ctx, read, missed), read.shape)
        head = charge(hw, *head_bill(fp, 1))
        for name in ("ops", "dram_bytes", "flash_bytes", "compute_j", "dram_j", "flash_j"):
            out[:, COL[name]] = np.sum(getattr(layer_cost, name), axis=1) + getattr(head, name)
        out[:, COL["latency_s"]] = layer_cost.latency_s.sum(1) + head.latency_s
        return out


def miss_ratio_curve(stream: Stream, cfg: RunConfig, fractions) -> list[dict]:
    """Decode miss rates of `cfg` replayed at each cache size in `fractions` (shares of all
    routed experts at the 8-bit reference size): the miss-ratio curve of the stream."""
    rows = []
    for frac in fractions:
        c = dataclasses.replace(
            cfg, cache=dataclasses.replace(cfg.cache, frac=float(frac), bytes=None), trace=False
        )
        try:
            r = replay(stream, c)
        except ConfigError:  # too small for one slice
            continue
        rows.append({"cache_frac": float(frac), **{k: r[k] for k in MRC_METRICS}})
    return rows


MRC_METRICS = (
    "cache_capacity_bytes",
    "miss_rate",
    "miss_rate_steady",
    "miss_rate_hbn",
    "miss_rate_refn",
    "flash_bytes_per_token",
)
