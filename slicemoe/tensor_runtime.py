"""The runtime of B simulated devices kept on the model's device.

The same simulation as slicemoe.runtime.Runtime (the readable reference, on the host, one
Python SliceCache per row; whole runs give the same metrics through either), with every
per-device quantity a tensor row and every rule an operation on all rows at once: the caches
and slicemoe.device's slice rules (slicemoe.cache.tensor; on CUDA one kernel per layer step,
slicemoe.cache.kernel), routing with the cache state (all four policies), DBSC's
precision, policy.on_miss, the miss-rate controller, prefetching, the request stream and the
hardware bill (slicemoe.device's). A decode step never waits for the host, so it can be captured
once and replayed (slicemoe.simulator).

Prefill routes on the device and counts; the caches then take the prefill stream and the warmup
on the host, through the same SliceCache code as the reference (once per batch), and continue
on the device (slicemoe.cache.tensor.from_slicecaches).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from slicemoe.cache import KINDS, SliceCache
from slicemoe.cache import tensor as tc
from slicemoe.device import decode_bill, head_bill
from slicemoe.hardware import charge
from slicemoe.metrics import COL, COST_COUNTERS, COUNTERS
from slicemoe.routing import RoutingParams, droppable, precision, route, without
from slicemoe.runtime import LAMBDA_GAIN, RuntimeRules

# On CUDA a pass that only records (`_route_only`: a cache-independent config's stream) writes
# its ranking and request stream on a stream of their own, beside the layer's experts, which do
# not wait for them (False: on the routing's stream). A simulating pass keeps them in place.
RECORD_ASIDE = True


@dataclass
class Rows:
    """One batch on the device: B rows, decode steps up to `steps`."""

    valid: torch.Tensor  # [B, S] prompt tokens (no padding)
    counts: torch.Tensor  # [B, L, E] prefill routing counts
    phase: str = "prefill"
    cache: tc.CacheState | None = None
    t: torch.Tensor | None = None  # () this decode step
    limit: torch.Tensor | None = None  # [B] decode steps each row runs
    context: torch.Tensor | None = None  # [B] tokens in each row's KV cache
    on: torch.Tensor | None = None  # [B] rows decoding this step
    lam: torch.Tensor | None = None  # [B] cache_prior strength (adapted by the controller)
    range_sum: torch.Tensor | None = None  # [B, L] router logit ranges, lam_scale=running
    range_n: torch.Tensor | None = None
    base: torch.Tensor | None = None  # [B, 2] (Flash bytes, activations) at warmup_steps
    base_set: torch.Tensor | None = None  # [B]
    # [B, 5] expert, high-bit, dropped calls, tokens, resident sum
    calls: torch.Tensor | None = None
    layer_calls: torch.Tensor | None = None  # [B, 2, L] predicted for, covered
    predicted: torch.Tensor | None = None  # [B, E] experts predicted for the next layer step
    predicted_on: torch.Tensor | None = None  # [B] ... where a prediction was made
    # [B, len(LOG), L] this step's layer steps: bytes read, missed and moved, expert calls
    # computed, served high-bit and dropped, whether a prediction was made for the layer step
    # and the calls it covered (summed into the counters at the step's end)
    log: torch.Tensor | None = None
    cost: torch.Tensor | None = None  # [B, COST_COUNTERS] decode cost so far
    history: torch.Tensor | None = None  # [steps, B, COUNTERS] after each step
    layer_history: torch.Tensor | None = None  # [steps, B, 2, L]
    # the request stream: [B, steps, L, k] experts, high-bit requests, next-gate ranking ...
    chosen: torch.Tensor | None = None
    high: torch.Tensor | None = None
    next_gate: torch.Tensor | None = None
    next_gate_critical: torch.Tensor | None = None


LOG = ("read", "missed", "moved", "computed", "served", "dropped", "counted", "covered")
READ, MISSED, MOVED, COMPUTED, SERVED, DROPPED, COUNTED, COVERED = range(len(LOG))
CALLS = ("expert_calls", "highbit_calls", "dropped_calls", "tokens", "resident_sum")
EXPERT_CALLS, HIGHBIT_CALLS, DROPPED_CALLS, TOKENS, RESIDENT = range(len(CALLS))


class TensorRuntime(RuntimeRules):
    def __init__(self, *rules, capacity: int, eviction: str, depth: int = 0,
                 simulate: bool = True, **kw):  # fmt: skip
        """runtime.RuntimeRules's arguments, and the caches' `capacity` and `eviction`;
        `depth`: ranking entries the request stream keeps (0: no stream is recorded, and no
        ranking is made unless the predictor reads it); `simulate=False`: only route and record
        (`_route_only`)."""
        super().__init__(*rules, **kw)
        self.depth, self.simulate = depth, simulate
        self.aside = None  # the recording's CUDA stream (`_aside`), made on first use
        fp, policy = self.fp, self.policy
        shape = fp.shape
        self.L, self.k = shape.num_moe_layers, shape.top_k
        self.spec = tc.Spec(
            self.L,
            self.E,
            tuple(fp.sizes[k] for k in KINDS),
            capacity,
            eviction,
            sliced=self.sliced,
            nested=fp.nested,
            on_miss=policy.on_miss,
            low_bytes=fp.low_bytes,
            prefetch_lsb=self.prefetch.slices == "critical",
            prefetch_cold=self.prefetch.insert == "lru",
        )

    def layer_step(self, state: Rows, *args):
        if state.cache.key.is_cuda:
            from slicemoe.cache.kernel import layer_step

            return layer_step(state.cache, self.spec, *args)
        return tc.layer_step(state.cache, self.spec, *args)

    def begin(self, caches: list[SliceCache], valid: torch.Tensor, seqs) -> Rows:
        dev = valid.device
        counts = torch.zeros((len(caches), self.L, self.E), dtype=torch.int64, device=dev)
        return Rows(valid, counts)

    def to_decode(self, state: Rows, caches, context, limit) -> None:
        """The warmed-up SliceCaches become the device's; `limit` [B]: decode steps per row."""
        dev, rows, steps = state.valid.device, len(caches), int(np.max(limit, initial=0))
        f64 = dict(dtype=torch.float64, device=dev)
        i64 = dict(dtype=torch.int64, device=dev)
        state.phase = "decode"
        state.cache = tc.from_slicecaches(self.spec, caches, dev) if self.simulate else None
        state.t = torch.zeros((), **i64)
        state.limit = torch.tensor(limit, **i64)  # copies: never a view of the caller's array
        state.context = torch.tensor(context, **i64)
        state.on = torch.zeros(rows, dtype=torch.bool, device=dev)
        state.lam = torch.full((rows,), float(self.policy.lam), **f64)
        state.range_sum = torch.zeros((rows, self.L), **f64)
        state.range_n = torch.zeros((rows, self.L), **i64)
        state.base = torch.zeros((rows, 2), **i64)
        state.base_set = torch.zeros(rows, dtype=torch.bool, device=dev)
        state.calls = torch.zeros((rows, len(CALLS)), **f64)
        state.layer_calls = torch.zeros((rows, 2, self.L), **i64)
        state.predicted = torch.zeros((rows, self.E), dtype=torch.bool, device=dev)
        state.predicted_on = torch.zeros(rows, dtype=torch.bool, device=dev)
        state.log = torch.zeros((rows, len(LOG), self.L), **i64)
        state.cost = torch.zeros((rows, len(COST_COUNTERS)), **f64)
        state.history = torch.zeros((steps, rows, len(COUNTERS)), **f64)
        state.layer_history = torch.zeros((steps, rows, 2, self.L), **i64)
        k, depth = self.k, max(self.depth, 1)
        state.chosen = torch.zeros((rows, steps, self.L, k), **i64)
        state.high = torch.zeros((rows, steps, self.L, k), dtype=torch.bool, device=dev)
        state.next_gate = torch.full((rows, steps, self.L, depth), -1, **i64)
        state.next_gate_critical = torch.zeros_like(state.high)
        if self.predictor is not None:
            self.predictor.start(rows, k, dev)

    def begin_step(self, state: Rows, step=None, active=None) -> None:
        """The next decode step of every row still within its limit. The host's `step` and
        `active` are not read: the step lives on the device, and rows that stop early (a stop
        string) are left out of the counters afterwards (slicemoe.simulator)."""
        t = state.t
        # In place: a captured step replays on these very tensors.
        state.on.copy_(t < state.limit)
        if not self.simulate:
            return
        opens = t == self.policy.warmup_steps
        stats = state.cache.stats
        now = torch.stack([_flash_bytes(stats), stats[:, tc.S["activations"]]], 1)
        state.base.copy_(torch.where(opens, now, state.base))
        state.base_set |= opens

    def end_step(self, state: Rows) -> None:
        """Bill the step's layers and LM head, keep the step's counters, advance the step."""
        if self.aside is not None:  # the recording read this step's t
            torch.cuda.current_stream().wait_stream(self.aside)
        if not self.simulate:
            state.t += 1
            return
        on, fp, log = state.on, self.fp, state.log
        # The layer steps' calls, summed here rather than after each layer step (each update is
        # a few kernels, and a captured step launches every one of them).
        calls = state.calls
        calls[:, EXPERT_CALLS] += torch.where(on, self.k * self.L, 0)
        calls[:, HIGHBIT_CALLS] += torch.where(on, log[:, SERVED].sum(1), 0)
        calls[:, DROPPED_CALLS] += log[:, DROPPED].sum(1)
        state.layer_calls[:, 0] += self.k * log[:, COUNTED]
        state.layer_calls[:, 1] += log[:, COVERED]
        bills = log.double()
        ctx = state.context.double()[:, None]
        ops, dram, flash, moved = decode_bill(
            fp, bills[:, COMPUTED], ctx, bills[:, READ], bills[:, MISSED], bills[:, MOVED]
        )
        layers = charge(self.hw, ops, dram, flash, moved)
        head = charge(self.hw, *head_bill(fp, 1))
        step_cost = torch.stack(
            [getattr(layers, n).sum(1) + getattr(head, n) for n in COST_COUNTERS], 1
        )
        state.cost += torch.where(on[:, None], step_cost, 0)
        state.context += on
        idx = state.t.view(1)
        state.history.index_copy_(0, idx, self._counters(state)[None])
        state.layer_history.index_copy_(0, idx, state.layer_calls[None])
        state.t += 1

    def _counters(self, state: Rows) -> torch.Tensor:
        """Per row, the cumulative COUNTERS (as runtime._row_counters)."""
        stats, rows = state.cache.stats.double(), state.cache.rows
        v = torch.zeros((rows, len(COUNTERS)), dtype=torch.float64, device=stats.device)
        for kind in KINDS:
            requests = stats[:, tc.S[f"requests_{kind}"]]
            v[:, COL[f"requests_{kind}"]] = requests
            v[:, COL[f"misses_{kind}"]] = requests - stats[:, tc.S[f"hits_{kind}"]]
        for name in ("activations", "prefetch_bytes", "prefetch_used_bytes"):
            v[:, COL[name]] = stats[:, tc.S[name]]
        for j, name in enumerate(CALLS):
            v[:, COL[name]] = state.calls[:, j]
        v[:, COL["predicted_calls"]] = state.layer_calls[:, 0].sum(1).double()
        v[:, COL["covered_calls"]] = state.layer_calls[:, 1].sum(1).double()
        first = COL[COST_COUNTERS[0]]  # the cost columns are the last ones, in order
        v[:, first : first + len(COST_COUNTERS)] = state.cost
        return v

    def history(self, state: Rows, steps: int):
        """(per-row COUNTERS after each of the first `steps` steps [steps, B, C],
        (predicted, covered) expert calls per layer [steps, B, 2, L]), on the host."""
        return state.history[:steps].cpu().numpy(), state.layer_history[:steps].cpu().numpy()

    def records(self, state: Rows, steps):
        """Per row, the request stream of its first steps[b] steps (Recorder.add's arrays, one
        entry per layer step)."""
        arrays = [state.chosen, state.high, state.next_gate, state.next_gate_critical]
        chosen, high, gate, crit = (a.flatten(1, 2).cpu().numpy() for a in arrays)
        n = np.asarray(steps) * self.L
        return [(chosen[b, :m], high[b, :m], gate[b, :m], crit[b, :m]) for b, m in enumerate(n)]

    # --- routing, inside the model's forward pass --------------------------------------------

    def _params(self, state: Rows, layer, logits, bias) -> RoutingParams:
        lam = state.lam.float()[:, None]
        if self.policy.lam_scale != "running":
            return replace(self.params, lam=lam, bias=bias)
        spread = (logits.amax(-1) - logits.amin(-1)).float().double()
        state.range_sum[:, layer] += torch.where(state.on, spread, 0)
        state.range_n[:, layer] += state.on
        mean = state.range_sum[:, layer] / state.range_n[:, layer].clamp_min(1)
        return replace(self.params, lam=lam, spread=mean.float()[:, None], bias=bias)

    def _decode(self, state: Rows, layer, logits, bias, hidden):
        if not self.simulate:
            return self._route_only(state, layer, logits, bias, hidden)
        on, spec, k = state.on, self.spec, self.k
        if self.policy.routing == "topk":  # reads neither the cache nor the controller
            idx, w = self.own_routing(logits, bias)
        else:
            cached = tc.resident(state.cache, spec, layer)
            params = self._params(state, layer, logits, bias)
            idx, w = route(self.policy.routing, self.gate, logits, cached, params)
        high = precision(self.policy.precision, w, self.policy.tau)
        drop = droppable(w, self.policy.drop_below) if self.policy.on_miss == "drop" else None
        ranking = None
        if self.ranker is not None and (self.depth or self.prefetch.predictor == "next_gate"):
            ranking = self.ranker.rank(layer, hidden)
        ahead = self._predict(state, layer, idx, ranking)
        predicted = []
        if self.predictor is not None:  # (without one, no call is ever predicted for)
            # Expert calls covered by the prediction made for this layer step.
            counted = on & state.predicted_on
            covered = torch.where(counted, state.predicted.gather(1, idx).sum(1), 0)
            predicted = [counted.long(), covered]
        served, dropped, missed, read, moved, held = self.layer_step(
            state, layer, idx, high, on, drop, ahead
        )
        if ahead is not None:
            _, experts, _, made = ahead
            state.predicted.zero_()
            state.predicted.scatter_(1, experts, True)
            state.predicted_on.copy_(on & made)
        elif self.predictor is not None:
            state.predicted_on.zero_()
        if layer == 0:
            state.calls[:, TOKENS] += on
            state.calls[:, RESIDENT] += held
        n_dropped = dropped.sum(1)
        row = [read, missed, moved, k - n_dropped, served.sum(1), n_dropped, *predicted]
        state.log[:, : len(row), layer] = torch.stack(row, 1)
        self._record(state, layer, idx, high, ranking)
        if layer == self.L - 1 and self.policy.miss_rate_target is not None:
            self._adapt_lambda(state)
        virt = torch.where(served, idx, idx + self.E)
        if drop is not None:
            # A dropped expert is computed at weight 0: its share goes to its token's other experts.
            w = without(w, dropped)
        return w.to(logits.dtype), virt

    def _route_only(self, state: Rows, layer, logits, bias, hidden):
        """`_decode` where only the request stream of a config whose requests do not depend on
        its cache is wanted (stream.cache_independent: top-k routing, every missed slice
        fetched): the model's routing and DBSC's precision, recorded, each call computed on the
        path it asked for, as the cache would serve it; no cache, bill or counters (a replay of
        the stream makes them, for any cache)."""
        idx, w = self.own_routing(logits, bias)
        high = precision(self.policy.precision, w, self.policy.tau)
        with self._aside(hidden, idx, high):
            ranking = self.ranker.rank(layer, hidden) if self.depth else None
            self._record(state, layer, idx, high, ranking)
        return w.to(logits.dtype), torch.where(high, idx, idx + self.E)

    @contextmanager
    def _aside(self, *inputs: torch.Tensor):
        """On CUDA (RECORD_ASIDE): the work within on the recording stream, after everything
        queued so far; `inputs` keep their memory until that stream has read them, and
        `end_step` waits for it."""
        if not (RECORD_ASIDE and inputs[0].is_cuda):
            yield
            return
        if self.aside is None:
            self.aside = torch.cuda.Stream(inputs[0].device)
        self.aside.wait_stream(torch.cuda.current_stream())
        for t in inputs:
            t.record_stream(self.aside)
        with torch.cuda.stream(self.aside):
            yield

    def _predict(self, state: Rows, layer: int, chosen, ranking):
        """The prefetch for the next layer: (target, experts, critical, rows predicted for)."""
        if self.predictor is None:
            return None
        self.predictor.observe(layer, chosen)
        pred = self.predictor.predict(layer, ranking)
        if pred is None:
            return None
        experts, crit, made = pred
        if isinstance(made, bool):  # a fill, not a copy from the host: capturable
            made = torch.full((len(chosen),), made, dtype=torch.bool, device=chosen.device)
        made = made.expand(len(chosen))
        return (layer + 1) % self.L, experts.contiguous(), crit.contiguous(), made.contiguous()

    def _record(self, state: Rows, layer: int, idx, high, ranking) -> None:
        if not self.depth:
            return
        t = state.t.view(1)
        state.chosen[:, :, layer].index_copy_(1, t, idx[:, None])
        state.high[:, :, layer].index_copy_(1, t, high[:, None])
        if ranking is None:
            ranking = self.ranker.nothing(len(idx), idx.device)
        gate, crit = ranking
        state.next_gate[:, :, layer].index_copy_(1, t, gate[:, None, : self.depth])
        state.next_gate_critical[:, :, layer].index_copy_(1, t, crit[:, None])

    def _adapt_lambda(self, state: Rows) -> None:
        """runtime.Runtime._adapt_lambda on every row at once."""
        stats = state.cache.stats
        acts = stats[:, tc.S["activations"]]
        flash0, acts0 = state.base[:, 0], state.base[:, 1]
        going = state.on & state.base_set & (acts > acts0)
        full = self.fp.sizes["FULL"]
        hbn = (_flash_bytes(stats) - flash0).double() / ((acts - acts0).clamp_min(1) * full)
        target = self.policy.miss_rate_target
        err = ((hbn - target) / max(target, 1e-6)).clamp(-1, 4)
        lam = (state.lam + LAMBDA_GAIN * err).clamp_min(0.0)
        state.lam.copy_(torch.where(going, lam, state.lam))


def _flash_bytes(stats: torch.Tensor) -> torch.Tensor:
    return sum(stats[:, tc.S[f"bytes_{k}"]] for k in KINDS)
