"""Cache and hardware accounting replayed from a recorded request stream, without the model.

`replay(stream, cfg)` returns exactly the metrics `slicemoe.run.run(cfg)` computes with the
model in the loop: for a cache-independent config at any cache capacity, eviction (Belady
included: the stream is its future), warmup, measurement window and hardware profile; for any
other replayable config (cache-aware routing, policy.on_miss=skip_lsb or substitute, a miss-rate
target) under any hardware profile, from the pass recorded with its cache and policy
(slicemoe.stream). The devices replay one after the other through the same
`SliceCache`, warmup functions, slice rules and bills (slicemoe.device) as the runtime, so there
is one definition of each rule.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from slicemoe.cache import KIND_CODE, KINDS, SliceCache, eviction_params
from slicemoe.config import RunConfig
from slicemoe.device import (
    HIGH,
    Footprint,
    charge_all,
    computes_high,
    decode_bill,
    expert_call,
    fetch_ahead,
    footprint,
    head_bill,
    is_sliced,
    prefill_cost,
    slice_kinds,
    warm_up,
)
from slicemoe.hardware import Cost, charge
from slicemoe.metrics import COL, COST_COUNTERS, COUNTERS, assemble, stats_row
from slicemoe.prefetch import top_m
from slicemoe.quant import reference_bytes
from slicemoe.stream import Stream, cache_independent, not_replayable, replayable, stream_key
from slicemoe.trace import write_trace
from slicemoe.validate import ConfigError, capacity_bytes, validate


def replay(stream: Stream, cfg: RunConfig, requests: list | None = None) -> dict:
    """The metrics dict (and curves, and trace with cfg.trace) of `cfg` from `stream`.
    `requests`, a list, gets per sequence its decode requests in order as arrays (step, layer,
    expert, kind code, hit); without prefetching and with policy.on_miss=fetch only
    (slicemoe.optimality reads them)."""
    t0 = time.time()
    # A replay reads the stream, not the model: it runs where the weights are not (the model's
    # config.json gives its shape).
    validate(cfg, weights=False)
    if not replayable(cfg):
        raise ValueError(f"{not_replayable(cfg)}; run it with the model in the loop")
    if stream_key(cfg) != stream.key:
        differ = "model, bits, precision, task or batch settings"
        if not cache_independent(cfg):  # its requests depend on its cache and policy
            differ += ", or (this config's requests depend on the cache) in cache or policy"
        raise ValueError(
            f"the stream was recorded for stream key {stream.key}, this config has "
            f"{stream_key(cfg)}: they differ in {differ}"
        )
    fp = footprint(stream.dims, stream.shape, cfg.bits, cfg.hardware)
    capacity = capacity_bytes(cfg, stream.shape)
    steps = int(stream.decode_steps.max()) if stream.num_sequences else 0
    rows = np.zeros((steps, len(COUNTERS)))
    layers = stream.shape.num_moe_layers
    layer_calls = (np.zeros(layers), np.zeros(layers))  # predicted for, covered (prefetching)
    prefill, warmup_bytes, traces = Cost(), 0, []
    for s in range(stream.num_sequences):
        device = _Device(cfg, fp, capacity, stream, s)
        prefill = prefill + device.prefill()
        cost, fills = device.warmup()
        prefill = prefill + cost.total()
        warmup_bytes += fills
        if cfg.prefetch.predictor == "none" and cfg.policy.on_miss == "fetch":
            rows[: device.steps] += device.decode(requests)
        else:
            rows[: device.steps] += device.decode_in_order(layer_calls)
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
        layer_calls,
    )
    # The recording's batch; a stream made otherwise (synthetic, imported) has none.
    result["batch_rows"] = stream.config.get("batch_size", math.nan)
    result["trace_path"] = write_trace(cfg, traces) if cfg.trace else None
    result["wall_s"] = time.time() - t0
    return result


class _Device:
    """One recorded sequence on its own simulated device."""

    def __init__(self, cfg: RunConfig, fp: Footprint, capacity: int, stream: Stream, s: int):
        self.cfg, self.fp, self.s = cfg, fp, s
        self.prompt_len, self.counts, self.experts, self.high = stream.sequence(s)
        self.next_gate, self.next_gate_critical = stream.next_gate_of(s)
        self.steps = len(self.experts)
        self.sliced = is_sliced(cfg.policy.precision)
        shape = stream.shape
        kinds = slice_kinds(self.sliced, fp.nested, True)
        future = None
        if cfg.cache.eviction == "belady":
            future = [k for k in self._requests(kinds) if k[2] != "LSB"]
        self.cache = SliceCache(
            capacity,
            fp.sizes,
            shape.num_moe_layers,
            shape.num_experts,
            cfg.cache.eviction,
            future,
            params=eviction_params(cfg.cache),
            seed=cfg.seed,
        )
        self.cache.counting = False
        self.cache.trace = [] if cfg.trace else None

    def _requests(self, prefill_kinds):
        """Every slice request of this device in order (the Belady oracle's future)."""
        for layer, row in enumerate(self.counts):
            for e in np.nonzero(row)[0]:
                yield from ((layer, int(e), k) for k in prefill_kinds)
        _, layers, experts, kinds, _ = self._decode_requests()
        for layer, e, kind in zip(layers.tolist(), experts.tolist(), kinds.tolist()):
            yield layer, e, KINDS[kind]

    def prefill(self) -> Cost:
        self.cache.tag = (self.s, "prefill", -1)
        hw = self.cfg.hardware
        return prefill_cost(self.fp, hw, self.cache, self.counts, self.prompt_len, self.sliced)

    def warmup(self) -> tuple[Cost, int]:
        rng = np.random.default_rng([self.cfg.seed, self.s])
        cfg = self.cfg
        return warm_up(
            self.fp, cfg.hardware, self.cache, self.counts, self.sliced, cfg.policy.warmup, rng
        )

    def _decode_requests(self):
        """The decode requests in order, as arrays: (step, layer, expert, kind code) per
        request, and the index of each step's last layer-0 request."""
        steps, layers, k = self.experts.shape
        high = self.high.ravel()
        # The runtime's rule (slice_kinds) for either path, applied to every call at once; a
        # second request is always the LSB slice right after its MSB.
        codes = {
            h: [KIND_CODE[x] for x in slice_kinds(self.sliced, self.fp.nested, h)]
            for h in (False, True)
        }
        first = np.where(high, codes[True][0], codes[False][0])
        n = np.where(high, len(codes[True]), len(codes[False]))
        kind = np.repeat(first, n)
        starts = np.cumsum(n) - n
        kind[starts[n == 2] + 1] = KIND_CODE["LSB"]
        call = np.arange(high.size)
        step, layer, expert = (
            np.repeat(call // (layers * k), n),
            np.repeat(call // k % layers, n),
            np.repeat(self.experts.ravel(), n),
        )
        layer0_end = (starts + n - 1).reshape(steps, layers * k)[:, k - 1]
        return step, layer, expert, kind, layer0_end

    def _hits(self, layer, expert, kind, step, marks):
        """Hit of every decode request, and resident experts after each mark."""
        # Imported here: numba is only needed to replay, not to run a model (GPU machines).
        from slicemoe.cache.compiled import EVICTIONS, key_ids, replay_requests

        cache = self.cache
        if cache.trace is None and self.cfg.cache.eviction in EVICTIONS:
            ids = key_ids(layer, expert, kind, cache.resident.shape[1])
            return replay_requests(cache, ids, marks, self.cfg.cache.eviction)
        # The reference: one SliceCache request at a time (LFU, Belady, traces).
        hits = np.zeros(len(kind), dtype=bool)
        resident = np.zeros(len(marks), dtype=np.int64)
        names, lsb = [KINDS[c] for c in kind], KIND_CODE["LSB"]
        m = i = 0
        while i < len(kind):
            # One expert call: its requests are consecutive, an LSB right after its MSB.
            j = i + 2 if i + 1 < len(kind) and kind[i + 1] == lsb else i + 1
            cache.tag = (self.s, "decode", int(step[i]))
            hits[i:j] = cache.access(int(layer[i]), int(expert[i]), names[i:j])
            while m < len(marks) and marks[m] < j:
                resident[m] = cache.resident.sum()
                m += 1
            i = j
        return hits, resident

    def decode(self, requests: list | None = None) -> np.ndarray:
        """COUNTERS of each decode step of this device, [steps, COUNTERS]; appends its decode
        requests and their hits to `requests` (see `replay`)."""
        fp = self.fp
        self.cache.counting = True
        steps, layers, k = self.experts.shape
        step, layer, expert, kind, marks = self._decode_requests()
        hits, resident = self._hits(layer, expert, kind, step, marks)
        if requests is not None:
            requests.append((step, layer, expert, kind, hits))
        sizes = np.array([fp.sizes.get(c, 0) for c in KINDS])
        out = np.zeros((steps, len(COUNTERS)))
        for code, name in enumerate(KINDS):
            of_kind = kind == code
            out[:, COL[f"requests_{name}"]] = np.bincount(step[of_kind], minlength=steps)
            out[:, COL[f"misses_{name}"]] = np.bincount(step[of_kind & ~hits], minlength=steps)
        missed = np.bincount(
            (step * layers + layer)[~hits], sizes[kind][~hits], minlength=steps * layers
        ).reshape(steps, layers)
        # With policy.on_miss=fetch a requested high-bit path is always served.
        served = {h: computes_high(slice_kinds(self.sliced, fp.nested, h)) for h in (False, True)}
        high = np.where(self.high, served[True], served[False])
        read = np.where(high, fp.sizes["FULL"], fp.low_bytes).sum(2).astype(float)
        out[:, COL["resident_sum"]] = resident
        out[:, COL["activations"]] = out[:, COL["expert_calls"]] = layers * k
        out[:, COL["highbit_calls"]] = high.sum((1, 2))
        out[:, COL["tokens"]] = 1
        hw = self.cfg.hardware
        ctx = (self.prompt_len + np.arange(steps))[:, None]
        layer_cost = charge_all(hw, decode_bill(fp, k, ctx, read, missed), read.shape)
        head = charge(hw, *head_bill(fp, 1))
        for name in COST_COUNTERS:
            out[:, COL[name]] = np.sum(getattr(layer_cost, name), axis=1) + getattr(head, name)
        return out

    # --- prefetching or misses not fetched: the reference loop, one layer step at a time ------

    def _predicted(self, t: int, layer: int):
        """What the prefetcher names after layer step (t, layer) for the next layer (layer 0
        of step t + 1 after the last): (experts, critical) or None, as the runtime's
        predictors (slicemoe.prefetch) do in the loop."""
        f, (steps, layers, k) = self.cfg.prefetch, self.experts.shape
        if f.predictor == "none":
            return None
        m = f.top_m or k
        nxt_t, nxt = (t, layer + 1) if layer + 1 < layers else (t + 1, 0)
        if f.predictor == "next_gate":
            if nxt == 0:
                return None
            return top_m(self.next_gate[t, layer], self.next_gate_critical[t, layer], m)
        if f.predictor == "prev_token":
            prev_t = nxt_t - 1  # the latest token the next layer has seen
            if prev_t < 0:
                return None
            return self.experts[prev_t, nxt, :m], np.zeros(min(m, k), dtype=bool)
        if nxt_t >= steps:  # oracle: the sequence ends here
            return None
        return self.experts[nxt_t, nxt, :m], self.high[nxt_t, nxt, :m]

    def decode_in_order(self, layer_calls) -> np.ndarray:
        """COUNTERS of each decode step of this device, [steps, COUNTERS], one expert call at a
        time and prefetching after every layer step as the runtime does; adds to `layer_calls`
        (predicted, covered)."""
        fp, cache, hw = self.fp, self.cache, self.cfg.hardware
        on_miss = self.cfg.policy.on_miss  # not drop: the stream has no gate weights
        cache.counting = True
        steps, layers, k = self.experts.shape
        out = np.zeros((steps, len(COUNTERS)))
        predicted = None  # the experts predicted for the layer step about to run
        head = charge(hw, *head_bill(fp, 1))
        for t in range(steps):
            before = stats_row(cache.stats)
            cost = head
            for layer in range(layers):
                cache.tag = (self.s, "decode", t)
                missed = read = 0
                for e, h in zip(self.experts[t, layer], self.high[t, layer]):
                    path, r, m = expert_call(
                        cache, fp, layer, int(e), self.sliced, bool(h), on_miss
                    )
                    read += r
                    missed += m
                    out[t, COL["highbit_calls"]] += path == HIGH
                if predicted is not None:
                    covered = sum(int(e) in predicted for e in self.experts[t, layer])
                    layer_calls[0][layer] += k
                    layer_calls[1][layer] += covered
                    out[t, COL["predicted_calls"]] += k
                    out[t, COL["covered_calls"]] += covered
                if layer == 0:
                    out[t, COL["resident_sum"]] = cache.resident.sum()
                moved, predicted = 0, None
                pred = self._predicted(t, layer)
                if pred is not None:
                    experts, crit = pred
                    predicted = {int(e) for e in experts}
                    target = (layer + 1) % layers
                    moved = fetch_ahead(
                        cache, target, experts, crit, self.cfg.prefetch, self.sliced, fp.nested
                    )
                bill = decode_bill(fp, k, self.prompt_len + t, read, missed, moved)
                cost = cost + charge(hw, *bill)
            out[t] += stats_row(cache.stats) - before
            for name in COST_COUNTERS:
                out[t, COL[name]] = getattr(cost, name)
        out[:, COL["expert_calls"]] = layers * k
        out[:, COL["tokens"]] = 1
        return out


def miss_ratio_curve(stream: Stream, cfg: RunConfig, fractions) -> list[dict]:
    """Decode miss rates of `cfg` replayed at each cache size in `fractions` (shares of all
    routed experts at the 8-bit reference size): the miss-ratio curve of the stream. Empty for a
    config whose requests depend on its cache: at another size they would be other requests."""
    if not cache_independent(cfg):
        return []
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
