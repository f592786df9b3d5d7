"""Put the slice cache, AMAT precision and hardware accounting inside a HF MoE model.

Two in-place changes per sparse block, both through the seams the model already has:
- `experts`: its fused weights become the quantized high-bit experts followed by the low-path
  experts (2E "virtual experts"); index e runs expert e at high precision, e + E at low. The
  model's own experts implementation (eager / grouped_mm) then computes whatever mix a token
  needs in one call.
- `gate`: its class is swapped for a subclass whose forward still computes the model's router
  logits (so `output_router_logits` keeps working) but hands the choice of experts and
  precision to the `Runtime`, which talks to the caches.

The runtime simulates B independent single-batch devices: row b of a batch has its own cache,
statistics and hardware meter, so a batch of prompts gives the same per-sequence results as
running them one at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from slicemoe import quant
from slicemoe.cache import SliceCache
from slicemoe.config import BitsConfig, HardwareConfig, PolicyConfig, PrefetchConfig
from slicemoe.hardware import Cost, charge
from slicemoe.metrics import COL, COST_COUNTERS, stats_row
from slicemoe.models import (
    EXPERT_BIASES,
    IN_OUT_EXPERTS,
    Dims,
    Shape,
    moe_blocks,
    router_of,
    selection_bias,
)
from slicemoe.models.code_experts import CodeExperts, supports
from slicemoe.routing import Gate, RoutingParams, precision, route

# --- quantization of a loaded model ---------------------------------------------------------


def _qdq(w: torch.Tensor, bits: BitsConfig, in_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantized (high path, low path) weights of one fused expert tensor; `in_out`: stored
    (E, in, out), so it is quantized along its middle (input) dimension."""
    if in_out:
        high, low = _qdq(w.transpose(-1, -2), bits, False)
        return high.transpose(-1, -2).contiguous(), low.transpose(-1, -2).contiguous()
    qt = quant.quantize(w, bits.high, bits.group, bits.symmetric)
    high = qt.dequantize(w.dtype)
    if bits.low is None:
        return high, high
    return high, quant.low_path(w, qt, bits.low, bits.scheme).dequantize(w.dtype)


@torch.no_grad()
def quantize_model(model, bits: BitsConfig, codes: bool = False) -> None:
    """Quantize experts (high and low path) and, optionally, the non-expert linear weights.

    `codes`: hold each family's experts once, as codes both paths compute from
    (slicemoe.models.code_experts), where its layout allows; otherwise (and for unquantized
    experts) the two paths are dequantized copies, 2E virtual experts of the family's own module.
    Routers stay as loaded: they are a negligible share of the bytes and routing decisions
    are what the cache policies study, so they should not move with the expert precision.
    """
    blocks = moe_blocks(model)
    in_out = model.config.model_type in IN_OUT_EXPERTS
    silu = getattr(model.config, "hidden_act", None) in ("silu", "swish")
    for block in blocks:
        ex = block.experts
        if codes and bits.high is not None and supports(ex, model.config):
            block.experts = CodeExperts(ex, bits, silu)
            continue
        e = ex.gate_up_proj.shape[0]
        if bits.high is None:  # unquantized experts: the low path is the high path
            pairs = [(p.data, p.data) for p in (ex.gate_up_proj, ex.down_proj)]
        else:
            pairs = [_qdq(p.data, bits, in_out) for p in (ex.gate_up_proj, ex.down_proj)]
        ex.gate_up_proj = torch.nn.Parameter(torch.cat(pairs[0]), requires_grad=False)
        ex.down_proj = torch.nn.Parameter(torch.cat(pairs[1]), requires_grad=False)
        for name in EXPERT_BIASES:  # kept as loaded, for both paths
            if hasattr(ex, name):
                b = getattr(ex, name).data
                setattr(ex, name, torch.nn.Parameter(torch.cat([b, b]), requires_grad=False))
        ex.num_experts = 2 * e
    if bits.nonexpert_bits is None:
        return
    routers = {id(p) for b in blocks for p in router_of(b).parameters()}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in routers:
            w = module.weight.data
            if w.shape[-1] % bits.nonexpert_group == 0:
                qt = quant.quantize(w, bits.nonexpert_bits, bits.nonexpert_group, symmetric=True)
                module.weight.data = qt.dequantize(w.dtype)


# --- accounting constants -------------------------------------------------------------------


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


# --- what a device is charged: per layer step, scalars or numpy arrays alike -------------------


def slice_kinds(sliced: bool, nested: bool, high: bool) -> tuple[str, ...]:
    """The slices an expert call requests, on the high-bit (`high`) or the low-bit path."""
    if not sliced:
        return ("FULL",)
    if not nested:
        return ("FULL",) if high else ("MSB",)
    return ("MSB", "LSB") if high else ("MSB",)


def computes_high(kinds: tuple[str, ...], lsb_served: bool = True) -> bool:
    """Whether a call that requested `kinds` runs on the high-bit path: a whole high-bit copy
    (FULL), or MSB + LSB when the LSB slice was there or fetched (lsb_miss=skip leaves MSB)."""
    return "MSB" not in kinds or (len(kinds) == 2 and lsb_served)


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


def decode_bill(fp: Footprint, experts, ctx, read, missed):
    """One MoE layer for one token after `ctx` cached ones: `experts` routed calls reading `read`
    expert bytes from DRAM, `missed` bytes fetched from Flash."""
    ops = _ops(fp, 1, experts, 4.0 * _attended(fp, fp.attn_dim, fp.window_attn_dim, ctx))
    kv = _attended(fp, fp.kv_bytes_per_token, fp.window_kv_bytes_per_token, ctx + 1)
    return ops, fp.dense_bytes + read + kv + missed, missed


def head_bill(fp: Footprint, tokens):
    """Embedding + LM head for `tokens` tokens (weights read once)."""
    return 2.0 * fp.head_params * fp.dense_op_cost * tokens, fp.head_bytes, 0


def stream_prefill(cache: SliceCache, counts: np.ndarray, kinds, sizes: dict):
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


def charge_all(hw: HardwareConfig, bill, shape) -> Cost:
    """The hardware cost of every layer step of `shape` (bill terms broadcast to it)."""
    return charge(hw, *(np.broadcast_to(np.asarray(x, float), shape) for x in bill))


def prefill_cost(fp: Footprint, hw: HardwareConfig, tokens: int, used, missed) -> Cost:
    """One device's prefill: every MoE layer's bill, and the LM head for the last token."""
    layers = charge_all(hw, prefill_bill(fp, tokens, 0, used, missed), used.shape)
    return layers.total() + charge(hw, *head_bill(fp, 1)).total()


# --- the runtime ----------------------------------------------------------------------------

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


@dataclass
class SeqState:
    """One simulated device: its cache, prefill counts, meters and decode tallies."""

    cache: SliceCache
    cost: np.ndarray  # [COST_COUNTERS] this device's decode cost so far
    expert_calls: int = 0
    highbit_calls: int = 0
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
    first_seq: int
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
        self.sliced = policy.precision in ("low", "dbsc")
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
        no_cache = torch.zeros_like(logits, dtype=torch.bool)
        idx, w = route("topk", self.gate, logits, no_cache, replace(self.params, bias=bias))
        onehot = torch.zeros((b * s, self.E), dtype=torch.int64, device=logits.device)
        onehot.scatter_(1, idx, 1)
        state.counts[:, layer] += (onehot.view(b, s, self.E) * state.valid.view(b, s, 1)).sum(1)
        return w.to(logits.dtype), idx

    def counts(self, state) -> np.ndarray:
        """[B, L, E] prefill routing counts."""
        return state.counts.cpu().numpy()


class Runtime(RuntimeRules):
    """The readable reference: each row's device simulated in Python with a SliceCache, on the
    host. slicemoe.models.tensor_runtime.TensorRuntime is the same on the model's device."""

    def begin(self, caches: list[SliceCache], valid: torch.Tensor, first_seq: int) -> Rows:
        """A new batch: one device per cache; `valid[b, s]` marks prompt tokens (no padding)."""
        layers = self.fp.shape.num_moe_layers
        seqs = [
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
        return Rows(seqs, first_seq, valid, counts)

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
            st.cache.tag = (state.first_seq + i, "decode", step)
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
        idx_np = idx.cpu().numpy()
        fp, fetch = self.fp, self.policy.lsb_miss == "fetch"
        ranking = recorded = None
        if self.ranker is not None:
            ranking = self.ranker.rank(layer, hidden)
            recorded = ranking if ranking is not None else self.ranker.nothing(len(seqs))
            recorded = [x.cpu().numpy() for x in recorded]
        use_high = np.zeros_like(high)
        bills = {}
        for row, st in enumerate(seqs):
            if not active[row]:
                use_high[row] = high[row]
                continue
            missed = read = 0
            for j, e in enumerate(idx_np[row]):
                kinds = self.kinds(bool(high[row, j]))
                hits = st.cache.access(layer, int(e), kinds, fetch_lsb=fetch)
                use_high[row, j] = computes_high(kinds, lsb_served=hits[-1] or fetch)
                missed += sum(
                    fp.sizes[k] for k, h in zip(kinds, hits) if not h and (fetch or k != "LSB")
                )
                read += fp.sizes["FULL"] if use_high[row, j] else fp.low_bytes
            if layer == 0:
                st.decode_tokens += 1
                st.resident_sum += float(st.cache.resident.sum())
            st.expert_calls += len(idx_np[row])
            st.highbit_calls += int(use_high[row].sum())
            st.chosen.append(idx_np[row])
            st.requested_high.append(high[row])
            if recorded is not None:
                st.next_gate.append(recorded[0][row])
                st.next_gate_critical.append(recorded[1][row])
            if st.predicted is not None:
                st.predicted_calls[layer] += len(idx_np[row])
                st.covered_calls[layer] += sum(int(e) in st.predicted for e in idx_np[row])
            bills[row] = decode_bill(fp, len(idx_np[row]), int(state.context[row]), read, missed)
        moved = self._prefetch(state, layer, ranking, idx)
        for row, (ops, dram, flash) in bills.items():
            # Prefetched slices are Flash reads and DRAM fills, overlapping this layer.
            cost = charge(self.hw, ops, dram + moved[row], flash + moved[row], moved[row])
            seqs[row].cost += [getattr(cost, name) for name in COST_COUNTERS]
        if layer == self.fp.shape.num_moe_layers - 1 and self.policy.miss_rate_target is not None:
            self._adapt_lambda(state)
        virt = torch.from_numpy(np.where(use_high, idx_np, idx_np + self.E)).to(idx.device)
        return w.to(logits.dtype), virt

    def kinds(self, high: bool) -> tuple[str, ...]:
        return slice_kinds(self.sliced, self.fp.nested, high)

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
    v[COL["tokens"]] = st.decode_tokens
    v[COL["resident_sum"]] = st.resident_sum
    v[COL["predicted_calls"]] = st.predicted_calls.sum()
    v[COL["covered_calls"]] = st.covered_calls.sum()
    v[[COL[name] for name in COST_COUNTERS]] = st.cost
    return v


def install(model, runtime: Bindable) -> None:
    """Swap each block's router class for one that defers to the runtime."""
    for layer, block in enumerate(moe_blocks(model)):
        gate = router_of(block)
        base = type(gate)
        if not getattr(base, "_slicemoe", False):
            gate.__class__ = type(
                f"Slice{base.__name__}", (base,), {"forward": _routed_forward, "_slicemoe": True}
            )
        gate._slicemoe_layer = layer
        gate._slicemoe_runtime = runtime


def router_logits(block, hidden: torch.Tensor):
    """A block's own router logits for `hidden` and its selection-only bias, without the
    runtime's routing (for predictors that score another layer's input)."""
    router = router_of(block)
    forward = (
        super(type(router), router).forward if hasattr(router, "_slicemoe") else router.forward
    )
    # MiniMax-M2, AFMoE and LFM2 keep the bias on the block and pass it to the router.
    args = tuple(
        getattr(block, n)
        for n in ("e_score_correction_bias", "expert_bias")
        if isinstance(getattr(block, n, None), torch.Tensor)
    )[:1]
    return forward(hidden, *args)[0], selection_bias(router, args)


def _routed_forward(self, hidden_states, *args):
    logits = super(type(self), self).forward(hidden_states, *args)[0]
    bias = selection_bias(self, args)
    weights, idx = self._slicemoe_runtime.routed(self._slicemoe_layer, logits, bias, hidden_states)
    return logits, weights, idx


__all__ = ["Runtime", "fetch_ahead", "footprint", "install", "quantize_model", "router_logits"]
