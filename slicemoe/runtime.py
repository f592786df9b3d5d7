"""The reference runtime: B simulated devices, one a row of a batch, each simulated in Python
with its own SliceCache on the host.

The model's routers defer to a runtime (slicemoe.models.adapter.install): `with
runtime.bound(state):` around a forward pass, every MoE layer calls `runtime.route(state, ...)`,
which routes with the model's gate and the policy, asks each row's device for the slices of its
expert calls and bills the layer step (slicemoe.device). Row b of a batch has its own cache,
statistics and hardware meter, so a batch of prompts gives the same per-sequence results as
running them one at a time. slicemoe.tensor_runtime is the same simulation on the model's device.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from slicemoe.cache import SliceCache
from slicemoe.config import HardwareConfig, PolicyConfig, PrefetchConfig
from slicemoe.device import (
    DROPPED,
    HIGH,
    Footprint,
    decode_bill,
    expert_call,
    fetch_ahead,
    head_bill,
    is_sliced,
)
from slicemoe.hardware import charge
from slicemoe.metrics import COL, COST_COUNTERS, stats_row
from slicemoe.routing import Gate, RoutingParams, droppable, precision, route, topk, without

# The miss-rate controller's proportional step per decode token on the relative error of the
# running miss rate. Picked by hand on the tiny model: large enough to settle within ~20 tokens,
# small enough not to oscillate.
LAMBDA_GAIN = 0.05


class Bindable:
    """The seam between a model's routers and a runtime: `with runtime.bound(state):` around a
    forward pass routes every MoE layer of it through `runtime.route(state, ...)`, so a batch's
    state is passed explicitly and nothing of it stays on the runtime between calls."""

    _state = None

    @contextmanager
    def bound(self, state):
        self._state = state
        try:
            yield
        finally:
            self._state = None

    def routed(self, layer: int, logits: torch.Tensor, bias, hidden):
        if self._state is None:
            raise RuntimeError("a SliceMoE model runs inside runtime.bound(state)")
        return self.route(self._state, layer, logits, bias, hidden)


class Packed(Bindable):
    """Runtimes that share a batch, each simulating its own rows (configs packed into one model
    pass, slicemoe.simulator): bound to their states, in row order, it hands each runtime the
    tokens of its rows and joins their routing."""

    def __init__(self, runtimes: list):
        self.runtimes = runtimes

    def route(self, states: list, layer: int, logits: torch.Tensor, bias=None, hidden=None):
        if len(self.runtimes) == 1:
            return self.runtimes[0].route(states[0], layer, logits, bias, hidden)
        rows = [len(state.valid) for state in states]
        per_row = logits.shape[0] // sum(rows)  # prefill: a row's positions; decode: 1
        if hidden is not None:  # one vector per token, as the logits
            hidden = hidden.reshape(logits.shape[0], -1)
        weights, idx, start = [], [], 0
        for runtime, state, n in zip(self.runtimes, states, rows):
            part = slice(start, start + n * per_row)
            h = None if hidden is None else hidden[part]
            w, i = runtime.route(state, layer, logits[part], bias, h)
            weights.append(w)
            idx.append(i)
            start = part.stop
        return torch.cat(weights), torch.cat(idx)


@dataclass
class SeqState:
    """One simulated device: its cache, prefill counts, meters and decode tallies."""

    cache: SliceCache
    cost: np.ndarray  # [COST_COUNTERS] this device's decode cost so far
    expert_calls: int = 0
    highbit_calls: int = 0
    dropped_calls: int = 0
    resident_sum: float = 0.0
    decode_tokens: int = 0
    lam: float = 0.0  # cache_prior strength, adapted online when policy.miss_rate_target is set
    # cache_prior with lam_scale=running: per layer, sum and count of router logit ranges.
    range_sum: np.ndarray | None = None
    range_n: np.ndarray | None = None
    # (Flash bytes, activations) when the controller's window opened (decode step warmup_steps).
    steady_base: tuple[int, int] | None = None
    # The request stream: per decode step and layer, the chosen experts and whether each one's
    # high-bit path was requested (slicemoe.stream).
    chosen: list = field(default_factory=list)
    requested_high: list = field(default_factory=list)
    # ... and the pre-gating ranking of the next layer's experts, with its critical flags.
    next_gate: list = field(default_factory=list)
    next_gate_critical: list = field(default_factory=list)
    # Prefetching (slicemoe.prefetch): the experts predicted for the layer about to run, and per
    # layer the expert calls a prediction was made for and those it covered.
    predicted: frozenset | None = None  # None: no prediction was made for it
    predicted_calls: np.ndarray | None = None
    covered_calls: np.ndarray | None = None


@dataclass
class Rows:
    """The reference runtime's state of one batch: a SeqState per row (device)."""

    seqs: list[SeqState]
    ids: np.ndarray  # [B] each row's sequence number
    valid: torch.Tensor  # [B, S] prompt tokens (no padding)
    counts: torch.Tensor  # [B, L, E] prefill routing counts
    phase: str = "prefill"
    step: int = -1
    active: np.ndarray | None = None  # [B] rows decoding this step
    context: np.ndarray | None = None  # [B] tokens in each row's KV cache
    # After each decode step: per-row cumulative COUNTERS [B, C] and (predicted, covered)
    # expert calls per layer [B, 2, L].
    history: list = field(default_factory=list)
    layer_history: list = field(default_factory=list)


class RuntimeRules(Bindable):
    """What every runtime is given: the gate, footprint, policy, hardware and prefetcher."""

    def __init__(
        self,
        gate: Gate,
        fp: Footprint,
        policy: PolicyConfig,
        hw: HardwareConfig,
        predictor=None,
        prefetch: PrefetchConfig | None = None,
        ranker=None,
    ):
        """`predictor`: the prefetcher (slicemoe.prefetch), or None; `ranker`: the NextGate whose
        ranking the predictor reads and the request stream records, or None."""
        self.gate, self.fp, self.policy, self.hw = gate, fp, policy, hw
        self.predictor, self.prefetch = predictor, prefetch or PrefetchConfig()
        self.ranker = ranker
        self.params = RoutingParams(
            lam=policy.lam,
            cumsum_p=policy.cumsum_p,
            max_rank_keep=policy.max_rank_keep,
            max_rank_m=policy.max_rank_m,
        )
        self.sliced = is_sliced(policy.precision)
        self.E = fp.shape.num_experts

    def route(self, state, layer: int, logits: torch.Tensor, bias=None, hidden=None):
        """Choose experts and precision for one MoE layer; returns (weights, virtual idx).
        `bias`: the router's selection-only score correction (DeepSeek-V3), if it has one;
        `hidden`: the block's input, for predictors that read it."""
        if state.phase == "prefill":
            return self._prefill(state, layer, logits, bias)
        return self._decode(state, layer, logits, bias, hidden)

    def _prefill(self, state, layer, logits, bias):
        """The model's own routing (top-k, high path), with no regard for the cache; the
        prefill counts of each row (PCW's hotness, and what streams through its cache)."""
        b, s = state.valid.shape
        idx, w = self.own_routing(logits, bias)
        onehot = torch.zeros((b * s, self.E), dtype=torch.int64, device=logits.device)
        onehot.scatter_(1, idx, 1)
        state.counts[:, layer] += (onehot.view(b, s, self.E) * state.valid.view(b, s, 1)).sum(1)
        return w.to(logits.dtype), idx

    def own_routing(self, logits, bias):
        """(experts, gate weights) of the model's own top-k routing, the cache disregarded."""
        return topk(self.gate, logits, None, replace(self.params, bias=bias))

    def counts(self, state) -> np.ndarray:
        """[B, L, E] prefill routing counts."""
        return state.counts.cpu().numpy()


class Runtime(RuntimeRules):
    """The readable reference: each row's device simulated in Python with a SliceCache, on the
    host. slicemoe.tensor_runtime.TensorRuntime is the same on the model's device."""

    def begin(self, caches: list[SliceCache], valid: torch.Tensor, seqs) -> Rows:
        """A new batch: one device per cache, for sequences `seqs`; `valid[b, s]` marks prompt
        tokens (no padding)."""
        layers = self.fp.shape.num_moe_layers
        devices = [
            SeqState(
                c,
                np.zeros(len(COST_COUNTERS)),
                lam=self.policy.lam,
                range_sum=np.zeros(layers),
                range_n=np.zeros(layers, dtype=np.int64),
                predicted_calls=np.zeros(layers, dtype=np.int64),
                covered_calls=np.zeros(layers, dtype=np.int64),
            )
            for c in caches
        ]
        if self.predictor is not None:
            self.predictor.start(len(caches), self.fp.shape.top_k, valid.device)
        counts = torch.zeros((len(caches), layers, self.E), dtype=torch.int64, device=valid.device)
        return Rows(devices, np.asarray(seqs), valid, counts)

    def to_decode(self, state: Rows, caches, context, limit) -> None:
        """Prefill is done and the caches (the rows' own) warmed up; `context` [B]: prompt
        tokens; `limit` [B]: decode steps each row may run (the reference is told each step
        which rows run)."""
        state.phase, state.context = "decode", np.asarray(context).copy()
        for st in state.seqs:
            st.cache.counting = True

    def begin_step(self, state: Rows, step: int, active: np.ndarray) -> None:
        """Decode step `step` of the rows in `active`."""
        state.step, state.active = step, np.asarray(active, dtype=bool).copy()
        for i, st in enumerate(state.seqs):
            st.cache.tag = (int(state.ids[i]), "decode", step)
            if step == self.policy.warmup_steps:
                st.steady_base = (st.cache.stats.flash_bytes, st.cache.stats.activations)

    def end_step(self, state: Rows) -> None:
        """The LM head of every row that ran, and the step's counters."""
        rows = np.nonzero(state.active)[0]
        head = charge(self.hw, *head_bill(self.fp, 1))
        for row in rows:
            state.seqs[row].cost += [getattr(head, name) for name in COST_COUNTERS]
        state.context = state.context + state.active
        state.history.append(np.stack([_row_counters(st) for st in state.seqs]))
        state.layer_history.append(
            np.stack([np.stack([st.predicted_calls, st.covered_calls]) for st in state.seqs])
        )

    def history(self, state: Rows, steps: int):
        """(per-row COUNTERS after each of the first `steps` steps [steps, B, C],
        (predicted, covered) expert calls per layer [steps, B, 2, L])."""
        return np.array(state.history[:steps]), np.array(state.layer_history[:steps])

    def records(self, state: Rows, steps):
        """Per row, the request stream of its first steps[b] steps (Recorder.add's lists)."""
        n = np.asarray(steps) * self.fp.shape.num_moe_layers
        return [
            (st.chosen[:m], st.requested_high[:m], st.next_gate[:m], st.next_gate_critical[:m])
            for st, m in zip(state.seqs, n)
        ]

    def _params(self, state: Rows, layer, logits, bias) -> RoutingParams:
        """This step's routing parameters, one lam (and logit range) per row."""
        lam = torch.tensor([[st.lam] for st in state.seqs], device=logits.device)
        if self.policy.lam_scale != "running":
            return replace(self.params, lam=lam, bias=bias)
        spread = (logits.amax(-1) - logits.amin(-1)).float().cpu().numpy()
        for row, st in enumerate(state.seqs):
            if state.active[row]:
                st.range_sum[layer] += spread[row]
                st.range_n[layer] += 1
        mean = [st.range_sum[layer] / max(st.range_n[layer], 1) for st in state.seqs]
        spread = torch.tensor(mean, device=logits.device).view(-1, 1)
        return replace(self.params, lam=lam, spread=spread, bias=bias)

    def _decode(self, state: Rows, layer, logits, bias, hidden):
        seqs, active = state.seqs, state.active
        cached = np.stack([st.cache.resident[layer] for st in seqs])
        params = self._params(state, layer, logits, bias)
        idx, w = route(self.policy.routing, self.gate, logits, torch.from_numpy(cached), params)
        high = precision(self.policy.precision, w, self.policy.tau).cpu().numpy()
        drop = droppable(w, self.policy.drop_below).cpu().numpy()
        idx_np = idx.cpu().numpy()
        fp, on_miss = self.fp, self.policy.on_miss
        ranking = recorded = None
        if self.ranker is not None:
            ranking = self.ranker.rank(layer, hidden)
            recorded = ranking if ranking is not None else self.ranker.nothing(len(seqs))
            recorded = [x.cpu().numpy() for x in recorded]
        use_high, dropped = high.copy(), np.zeros_like(high)
        bills = {}  # row -> (expert calls computed, expert bytes read, bytes missed)
        for row, st in enumerate(seqs):
            if not active[row]:
                continue
            missed = read = 0
            for j, e in enumerate(idx_np[row]):
                path, r, m = expert_call(
                    st.cache, fp, layer, int(e), self.sliced, bool(high[row, j]), on_miss,
                    bool(drop[row, j]),
                )  # fmt: skip
                use_high[row, j], dropped[row, j] = path == HIGH, path == DROPPED
                read += r
                missed += m
            if layer == 0:
                st.decode_tokens += 1
                st.resident_sum += float(st.cache.resident.sum())
            st.expert_calls += len(idx_np[row])
            st.highbit_calls += int(use_high[row].sum())
            st.dropped_calls += int(dropped[row].sum())
            st.chosen.append(idx_np[row])
            st.requested_high.append(high[row])
            if recorded is not None:
                st.next_gate.append(recorded[0][row])
                st.next_gate_critical.append(recorded[1][row])
            if st.predicted is not None:
                st.predicted_calls[layer] += len(idx_np[row])
                st.covered_calls[layer] += sum(int(e) in st.predicted for e in idx_np[row])
            bills[row] = len(idx_np[row]) - int(dropped[row].sum()), read, missed
        moved = self._prefetch(state, layer, ranking, idx)
        for row, (calls, read, missed) in bills.items():
            ctx = int(state.context[row])
            cost = charge(self.hw, *decode_bill(fp, calls, ctx, read, missed, moved[row]))
            seqs[row].cost += [getattr(cost, name) for name in COST_COUNTERS]
        if layer == self.fp.shape.num_moe_layers - 1 and self.policy.miss_rate_target is not None:
            self._adapt_lambda(state)
        virt = torch.from_numpy(np.where(use_high, idx_np, idx_np + self.E)).to(idx.device)
        # A dropped expert is computed at weight 0: its share goes to its token's other experts.
        w = without(w, torch.from_numpy(dropped).to(w.device))
        return w.to(logits.dtype), virt

    def _prefetch(self, state: Rows, layer: int, ranking, chosen: torch.Tensor) -> np.ndarray:
        """Fetch the predicted experts of the next layer (layer 0 of the next token after the
        last) into each active row's cache; the Flash bytes moved per row."""
        moved = np.zeros(len(state.seqs))
        if self.predictor is None:
            return moved
        self.predictor.observe(layer, chosen)
        pred = self.predictor.predict(layer, ranking)
        target = (layer + 1) % self.fp.shape.num_moe_layers
        made = pred is not None and bool(pred[2])
        experts, crit = (pred[0].cpu().numpy(), pred[1].cpu().numpy()) if made else (None, None)
        for row, st in enumerate(state.seqs):
            st.predicted = None
            if not state.active[row] or not made:
                continue
            st.predicted = frozenset(int(e) for e in experts[row])
            moved[row] = fetch_ahead(
                st.cache, target, experts[row], crit[row], self.prefetch, self.sliced,
                self.fp.nested,
            )  # fmt: skip
        return moved

    def _adapt_lambda(self, state: Rows) -> None:
        """Hold each device's high-bit-normalised miss rate under policy.miss_rate_target by
        raising cache_prior's lambda when above it and relaxing it when below. As in the paper,
        the constraint applies after `warmup_steps` decode steps and to the misses since then."""
        target = self.policy.miss_rate_target
        for row, st in enumerate(state.seqs):
            if not state.active[row] or st.steady_base is None:
                continue
            s, (flash0, acts0) = st.cache.stats, st.steady_base
            if s.activations > acts0:
                hbn = (s.flash_bytes - flash0) / ((s.activations - acts0) * self.fp.sizes["FULL"])
                err = (hbn - target) / max(target, 1e-6)
                st.lam = max(0.0, st.lam + LAMBDA_GAIN * float(np.clip(err, -1, 4)))


def _row_counters(st: SeqState) -> np.ndarray:
    """A device's cumulative decode COUNTERS."""
    v = stats_row(st.cache.stats)
    v[COL["expert_calls"]] = st.expert_calls
    v[COL["highbit_calls"]] = st.highbit_calls
    v[COL["dropped_calls"]] = st.dropped_calls
    v[COL["tokens"]] = st.decode_tokens
    v[COL["resident_sum"]] = st.resident_sum
    v[COL["predicted_calls"]] = st.predicted_calls.sum()
    v[COL["covered_calls"]] = st.covered_calls.sum()
    v[[COL[name] for name in COST_COUNTERS]] = st.cost
    return v
