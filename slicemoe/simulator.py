"""Batches of sequences through a SliceMoE model, one simulated device per row.

Two request types share one prefill and one decode step, as evaluation libraries split them:
- `generate_until(seqs, prompts, stop, max_new, eos)`: greedy generation, each text cut at its
  first stop string;
- `loglikelihood(seqs, prompts, forced)`: teacher-forced decoding, the NLL of every forced token.
Each call is one batch, a row per prompt; `seqs` are the prompts' sequence numbers in the run
(what seeds a row's warmup and names it in the stream and traces, so a sequence gives the same
results in any batch, in any order). Several configs that share the loaded model can share the
pass (packed): each is a `Group` of devices with its own runtime, caches, policy and hardware,
and a batch holds the same sequences once per group, side by side. A group keeps, over all
batches, what its run's metrics are made of (slicemoe.run): the decode counters of every step
summed over its devices, the prefill cost, the warmup's Flash bytes, the request stream and
traces. A batch adds to them only when it closes, so one that fails (out of GPU memory) leaves
no trace.

Decode step t of a batch chooses token t of every row (greedy, or the forced one) from the last
logits and feeds it; every MoE layer routes through the runtime. The host learns that a row has
stopped (eos or a stop string) from its tokens after the step, so a row's counters are kept only
for the steps before the one that chose its stop token: each row is charged exactly for the
tokens it consumed, whenever the host looks.

Backends (`model.backend`): `python`, the readable reference (runtime.Runtime, a SliceCache per
row on the host), or `tensor` (tensor_runtime.TensorRuntime, the same on the model's device);
`auto` takes `tensor` on CUDA. KV caches: a static cache with the simulator's own masks where
every layer is full attention, transformers' dynamic cache and masks otherwise. With the device
runtime on CUDA the whole decode step (token choice, model, caches, routing, hardware bill) is
captured once per batch in a CUDA graph and replayed.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache, StaticCache

from slicemoe.batching import PREFILL_TOKENS
from slicemoe.cache import SliceCache, eviction_params
from slicemoe.cache.tensor import EVICTIONS
from slicemoe.config import RunConfig
from slicemoe.device import footprint, is_sliced, prefill_cost, warm_up
from slicemoe.hardware import Cost
from slicemoe.metrics import COUNTERS
from slicemoe.models import gate_rule, model_dims, moe_blocks
from slicemoe.models.adapter import install, router_logits
from slicemoe.models.code_experts import CodeExperts
from slicemoe.prefetch import NextGate, make_predictor
from slicemoe.runtime import Packed, Runtime
from slicemoe.stream import Recorder, cache_independent
from slicemoe.tensor_runtime import TensorRuntime
from slicemoe.validate import capacity_bytes

# How often (decode steps) the device backend shows the host its tokens, to find stopped rows.
CHECK_EVERY = 8
# Attention kernels a prefill piece may use: not cuDNN's, which builds a plan for every new shape
# (0.3 s each on an H100, and each piece of each batch has its own), more than its kernel saves.
PREFILL_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Batch:
    """One batch's decode state, passed to every step. Rows are group-major: group g holds rows
    g * n .. (g + 1) * n, the batch's n sequences once more."""

    seqs: np.ndarray  # [B // groups] each row's sequence number
    lens: np.ndarray  # [B] prompt tokens
    limit: np.ndarray  # [B] decode steps each row may run
    states: list  # each group's runtime state (runtime.Rows or tensor_runtime.Rows)
    kv: object  # DynamicKV or StaticKV
    logits: torch.Tensor  # [B, V] of the last forward pass
    pos: torch.Tensor  # [B] position of the next token
    t: torch.Tensor  # () the step, on the device
    tokens: torch.Tensor  # [B, steps + 1] the token chosen at each step
    forced: torch.Tensor | None  # [B, steps] teacher-forced tokens, pad past a row's end
    nll: torch.Tensor | None  # [B, steps]
    # Prefill and warmup, per group: the Cost of each row's prefill then warmup, in order, and
    # the bytes each warmup filled; the group's only when the batch ends.
    prefill_costs: list
    warmup_bytes: list
    step: int = 0  # the step, on the host
    graph: Captured | None = None  # the decode step, captured (CUDA)

    def rows(self, g: int) -> slice:
        n = len(self.lens) // len(self.states)
        return slice(g * n, (g + 1) * n)


class Group:
    """One config's simulated devices in a pass (a row each per batch sequence): its runtime and
    what its run's metrics are made of, over every batch that closed."""

    def __init__(self, cfg: RunConfig, loaded, dims, record: bool, device: torch.device,
                 streams_only: bool = False):  # fmt: skip
        self.cfg = cfg
        model = loaded.model
        self.fp = fp = footprint(dims, loaded.shape, cfg.bits, cfg.hardware)
        gate = gate_rule(model.config)
        blocks = moe_blocks(model)

        def logits(layer, hidden):
            return router_logits(blocks[layer], hidden)

        self.recorder = Recorder(loaded.shape)
        self.shape = loaded.shape
        self.capacity = capacity_bytes(cfg, loaded.shape)
        predictor = make_predictor(cfg.prefetch, gate.top_k, len(blocks))
        # One ranking per layer step serves both the stream and next_gate (which may read
        # deeper than the stream records).
        depth = max(self.recorder.depth, cfg.prefetch.top_m)
        ranker = NextGate(gate, logits, len(blocks), depth, cfg.policy.tau)
        self.backend = backend(cfg, device)
        # Where only the request stream is wanted and it does not depend on the cache, the
        # device runtime runs no cache, bill or counters: the stream's replays make them.
        self.simulate = not (streams_only and cache_independent(cfg) and self.backend == "tensor")
        rules = (gate, fp, cfg.policy, cfg.hardware, predictor, cfg.prefetch, ranker)
        if self.backend == "tensor":
            depth = self.recorder.depth if record else 0
            self.rt = TensorRuntime(
                *rules, capacity=self.capacity, eviction=cfg.cache.eviction, depth=depth,
                simulate=self.simulate,
            )  # fmt: skip
        else:
            self.rt = Runtime(*rules)
        self.record = record
        # Over all batches: step_rows[t] = COUNTERS of decode step t summed over every device;
        # per MoE layer, expert calls a prefetch was made for and those it covered.
        self.step_rows: list[np.ndarray] = []
        self.prefill_cost = Cost()
        self.warmup_bytes = 0.0
        layers = loaded.shape.num_moe_layers
        self.layer_predicted, self.layer_covered = np.zeros(layers), np.zeros(layers)
        self.traces = {}  # sequence number -> its requests (cfg.trace)

    def begin(self, seqs: np.ndarray, valid: torch.Tensor):
        caches = self._caches(seqs) if self.simulate else [None] * len(seqs)
        return caches, self.rt.begin(caches, valid, seqs)

    def warm(self, state, caches, seqs: np.ndarray, lens, steps):
        """Each row's prompt streams through its cache, then the warmup, then decode: (the
        Costs of each row's prefill then warmup, the bytes each warmup filled; none without a
        cache to simulate)."""
        cfg = self.cfg
        costs, fills = [], []
        if self.simulate:
            counts = self.rt.counts(state)
            sliced = is_sliced(cfg.policy.precision)
            for i, c in enumerate(caches):
                bill = prefill_cost(self.fp, cfg.hardware, c, counts[i], int(lens[i]), sliced)
                # Seeded per sequence, so a sequence warms up alike in any batch.
                rng = np.random.default_rng([cfg.seed, int(seqs[i])])
                cost, filled = warm_up(
                    self.fp, cfg.hardware, c, counts[i], sliced, cfg.policy.warmup, rng
                )
                costs += [bill, cost.total()]
                fills.append(filled)
        self.rt.to_decode(state, caches, lens, steps)
        return costs, fills

    def read(self, state, steps: np.ndarray):
        """What a batch whose row b consumed steps[b] tokens adds to the run, each row's from the
        steps it ran only, read from the device (`add` changes the run's totals)."""
        ran = int(steps.max(initial=0))
        history, layer_history = self.rt.history(state, ran)
        records = None
        if self.record:
            records = self.rt.counts(state), self.rt.records(state, steps)
        counters = np.diff(history, axis=0, prepend=0.0)  # [ran, B, C] per step and row
        kept = np.arange(ran)[:, None] < steps[None, :]
        rows = (counters * kept[..., None]).sum(1)
        layers = [layer_history[steps[b] - 1, b] for b in np.nonzero(steps)[0]]
        traces = None
        if self.cfg.trace:
            # (sequence, phase, step, ...): decode requests of the steps the row ran
            traces = [
                [r for r in st.cache.trace if r[1] == "prefill" or r[2] < steps[b]]
                for b, st in enumerate(state.seqs)
            ]
        return rows, layers, records, traces

    def add(self, read, seqs: np.ndarray, lens, costs, fills) -> None:
        """A closed batch's prefill cost, counters, request stream and traces join the run's."""
        rows, layers, records, traces = read
        for cost in costs:
            self.prefill_cost += cost
        for filled in fills:
            self.warmup_bytes += filled
        while len(self.step_rows) < len(rows):
            self.step_rows.append(np.zeros(len(COUNTERS)))
        for t, row in enumerate(rows):
            self.step_rows[t] += row
        for predicted, covered in layers:
            self.layer_predicted += predicted
            self.layer_covered += covered
        if records is not None:
            counts, rows_records = records
            for b, record in enumerate(rows_records):
                self.recorder.add(int(seqs[b]), int(lens[b]), counts[b], *record)
        if traces is not None:
            self.traces.update(zip(seqs.tolist(), traces))

    def rows(self) -> np.ndarray:
        """[steps, COUNTERS]: every decode step's counters, summed over all devices."""
        return np.array(self.step_rows).reshape(-1, len(COUNTERS))

    def _caches(self, seqs: np.ndarray) -> list[SliceCache]:
        shape, cfg = self.shape, self.cfg
        caches = []
        for seq in seqs:
            # Seeded as the replay seeds a sequence's cache (LeCaR draws), in any batch.
            c = SliceCache(
                self.capacity, self.fp.sizes, shape.num_moe_layers, shape.num_experts,
                cfg.cache.eviction, params=eviction_params(cfg.cache), seed=cfg.seed,
            )  # fmt: skip
            c.trace = [] if cfg.trace else None
            c.tag = (int(seq), "prefill", -1)
            c.counting = False  # statistics are decode statistics
            caches.append(c)
        return caches


class Simulator:
    def __init__(self, cfgs, loaded, record: bool = False, static: bool | None = None,
                 capture: bool = True, progress=None, streams_only: bool = False):  # fmt: skip
        """`cfgs`: a RunConfig, or several that share `loaded` (packed: each a Group of rows of
        every batch); `loaded`: slicemoe.run.Loaded; `record`: keep the request streams
        (slicemoe.stream); `streams_only`: nothing but them is wanted (a group whose requests
        do not depend on its cache then simulates none: Group.simulate); `static`: the static
        KV cache (None: wherever every layer is full attention); `capture`: the decode step as
        a CUDA graph wherever it can be; `progress(sequences, tokens)`: told at most
        CHECK_EVERY decode steps apart the sequences (rows) ended and the tokens decoded so far,
        over all batches (one that fails is forgotten, as it is here)."""
        cfgs = [cfgs] if isinstance(cfgs, RunConfig) else list(cfgs)
        self.loaded, self.record = loaded, record
        self.progress = progress
        self.clock = loaded.clock
        model = loaded.model
        self.model, self.device = model, torch.device(loaded.device)
        self.dims = model_dims(model)
        self.groups = [Group(c, loaded, self.dims, record, self.device, streams_only) for c in cfgs]
        backends = {g.backend for g in self.groups}
        if len(backends) > 1:
            raise ValueError(f"packed configs run on one backend, not {sorted(backends)}")
        (self.backend,) = backends
        self.rt = Packed([g.rt for g in self.groups])
        install(model, self.rt)
        if static and not static_kv(model):
            raise ValueError("static=True: this model has layers that are not full attention")
        self.static = static_kv(model) if static is None else static
        # The decode step is captured where nothing in it waits for the host: the device
        # runtime, with the experts as codes, on CUDA, with the static KV cache.
        coded = all(isinstance(b.experts, CodeExperts) for b in moe_blocks(model))
        cuda = self.device.type == "cuda"
        self.graphs = capture and self.static and coded and self.backend == "tensor" and cuda
        self.cache_kw = cache_kw(model)
        tok = loaded.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.ended = self.decoded = 0  # sequences and decode tokens of the closed batches

    # --- the two request types ------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, seqs, prompts, stop=(), max_new=64, eos=None) -> list[str]:
        """Greedy continuations of `prompts` (token lists), up to `max_new` tokens, eos or a
        stop string; each text cut at its first stop string. Packed: the texts of every group,
        one after another."""
        with self._timed("prefill"):
            batch = self.prefill(seqs, prompts, steps=np.full(len(prompts), max_new - 1))
        tok = self.loaded.tokenizer
        rows = len(batch.lens)
        finish = np.full(rows, -1)  # the step whose token stopped the row
        texts = [""] * rows
        seen = 0  # tokens the host has looked at
        every = 1 if self.backend == "python" else CHECK_EVERY
        # The device runtime runs every row within its limit whatever the host knows, so the
        # host reads a check's tokens once the next step is queued behind their copy: the
        # device decodes while the host detokenises. The reference skips stopped rows at once.
        lag = 0 if self.backend == "python" else 1
        checks = []  # (step, its tokens on their way to the host)
        for t in range(max_new):
            last = t == max_new - 1
            with self._timed("decode"):
                self.decode_step(batch, active=finish < 0, feed=not last)
            if last or (t + 1) % every == 0:
                checks.append((t, _to_host(batch.tokens[:, : t + 1])))
            while checks and (t - checks[0][0] >= lag or last):
                now, copy = checks.pop(0)
                chosen = copy()
                running = np.nonzero(finish < 0)[0]
                # One decode of each running row; only a row that stopped is searched for the
                # token that stopped it (a stop string, once decoded, stays in longer texts).
                decoded = tok.batch_decode(chosen[running].tolist())
                for i, text in zip(running, decoded):
                    texts[i] = text
                    if not ((chosen[i, seen:] == eos).any() or any(s in text for s in stop)):
                        continue
                    for j in range(seen, now + 1):
                        texts[i] = tok.decode(chosen[i, : j + 1].tolist())
                        if chosen[i, j] == eos or any(s in texts[i] for s in stop):
                            finish[i] = j
                            break
                seen = now + 1
                known = max_new - 1 if seen == max_new else np.inf
                self._tell(np.where(finish >= 0, finish, known), seen)
            if (finish >= 0).all():
                break
        with self._timed("end"):
            self.end(batch, np.where(finish < 0, max_new - 1, finish))
        return [_cut(text, stop) for text in texts]

    @torch.no_grad()
    def loglikelihood(self, seqs, prompts, forced) -> list[list[float]]:
        """The NLL of each token of `forced[b]` (token lists) after `prompts[b]`, teacher-forced.
        Packed: the NLLs of every group, one after another."""
        with self._timed("prefill"):
            batch = self.prefill(
                seqs, prompts, steps=np.array([len(f) for f in forced]), forced=forced
            )
        lens = batch.limit
        steps = int(lens.max(initial=0))
        with self._timed("decode"):
            for t in range(steps):
                self.decode_step(batch, active=batch.step < lens)
                if (t + 1) % CHECK_EVERY == 0:
                    self._tell(lens, t + 1)
        self._tell(lens, steps)
        with self._timed("end"):
            self.end(batch, lens)
        nll = batch.nll.cpu().numpy()
        return [nll[b, :n].tolist() for b, n in enumerate(lens)]

    def _tell(self, ends: np.ndarray, now: int) -> None:
        """`progress` after decode step `now` of the open batch, whose row b consumes ends[b]
        tokens (inf while the host does not know)."""
        if self.progress is not None:
            done = self.ended + int((ends <= now).sum())
            self.progress(done, self.decoded + int(np.minimum(ends, now).sum()))

    def _timed(self, phase: str):
        return nullcontext() if self.clock is None else self.clock(phase, self.device)

    # --- prefill and the decode step ----------------------------------------------------------

    def prefill(self, seqs, prompts, steps: np.ndarray, forced=None) -> Batch:
        """Prompts through the model once per group (left-padded, each row its own positions),
        every used expert streamed through each row's cache, then the warmup: a Batch ready to
        decode, the rows of prompt i for up to steps[i] steps."""
        dev, groups = self.device, len(self.groups)
        seqs = np.asarray(seqs, dtype=np.int64)
        if len(seqs) != len(prompts):
            raise ValueError(f"seqs: {len(seqs)} sequence numbers for {len(prompts)} prompts")
        prompts, steps = list(prompts) * groups, np.tile(steps, groups)
        rows = len(prompts)
        lens = np.array([len(p) for p in prompts])
        ids, mask = left_pad(prompts, self.pad)
        s = ids.shape[1]
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        n = rows // groups
        begun = [
            g.begin(seqs, mask[i * n : (i + 1) * n].bool().to(dev))
            for i, g in enumerate(self.groups)
        ]
        states = [state for _, state in begun]
        horizon = int(steps.max(initial=0))
        kv = (StaticKV if self.static else DynamicKV)(self.model, self.cache_kw, rows, s + horizon)
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        for a, b in kv.pieces(rows, s):
            # the runtimes' prefill counts take the piece's positions
            with self.rt.bound([replace(st, valid=st.valid[:, a:b]) for st in states]):
                logits = kv.prefill(ids[:, a:b], mask[:, :b], pos[:, a:b])
        warmed = [
            g.warm(state, caches, seqs, lens[:n], steps[:n])
            for g, (caches, state) in zip(self.groups, begun)
        ]
        tokens = torch.full((rows, horizon + 1), self.pad, dtype=torch.long, device=dev)
        forced_t = nll = None
        if forced is not None:
            forced_t = torch.full((rows, max(horizon, 1)), self.pad, dtype=torch.long)
            for i, f in enumerate(list(forced) * groups):
                forced_t[i, : len(f)] = torch.tensor(f, dtype=torch.long)
            forced_t = forced_t.to(dev)
            nll = torch.zeros((rows, max(horizon, 1)), dtype=torch.float32, device=dev)
        return Batch(
            seqs, lens, steps, states, kv, logits, pos[:, -1].to(dev) + 1,
            torch.zeros((), dtype=torch.long, device=dev), tokens, forced_t, nll,
            [costs for costs, _ in warmed], [fills for _, fills in warmed],
        )  # fmt: skip

    def decode_step(self, batch: Batch, active: np.ndarray, feed: bool = True) -> None:
        """Decode step `batch.step`: choose every row's token and, with `feed`, run it through
        the model with the caches in the loop. `active` [B]: rows the host knows still run (the
        reference runtime skips the others; the device one runs every row within its limit)."""
        if not feed:
            self._choose(batch)
            return
        if self.graphs:
            if batch.graph is None:
                batch.graph = Captured(lambda: self._step(batch, None))
            batch.graph()
        else:
            self._step(batch, active)
        batch.step += 1

    def _step(self, batch: Batch, active) -> None:
        """One decode step in device operations (replayable as a CUDA graph)."""
        tok = self._choose(batch)
        for i, (g, state) in enumerate(zip(self.groups, batch.states)):
            g.rt.begin_step(state, batch.step, None if active is None else active[batch.rows(i)])
        with self.rt.bound(batch.states):
            logits = batch.kv.step(tok, batch.pos)
        for g, state in zip(self.groups, batch.states):
            g.rt.end_step(state)
        batch.logits.copy_(logits)
        batch.pos += 1
        batch.t += 1

    def _choose(self, batch: Batch) -> torch.Tensor:
        """Token t of every row: greedy, or the forced one (scored)."""
        t = batch.t.view(1)
        logp = torch.log_softmax(batch.logits, -1)
        if batch.forced is None:
            tok = logp.argmax(-1)
        else:
            tok = batch.forced.index_select(1, t)[:, 0]
            batch.nll.index_copy_(1, t, -logp.gather(1, tok[:, None]))
        batch.tokens.index_copy_(1, t, tok[:, None])
        return tok

    def end(self, batch: Batch, steps: np.ndarray) -> None:
        """Close a batch whose row b consumed steps[b] tokens: each group's share joins its run,
        read from the device before any group's totals change."""
        # The captured step refers to the batch it steps: dropped now rather than whenever the
        # garbage collector finds that cycle, the KV cache is freed before the next batch's.
        batch.graph = None
        reads = [
            g.read(state, steps[batch.rows(i)])
            for i, (g, state) in enumerate(zip(self.groups, batch.states))
        ]
        for i, (g, read) in enumerate(zip(self.groups, reads)):
            rows = batch.rows(i)
            g.add(read, batch.seqs, batch.lens[rows], batch.prefill_costs[i],
                  batch.warmup_bytes[i])  # fmt: skip
        self.ended += len(steps)
        self.decoded += int(steps.sum())


class Clock:
    """Seconds a run spends in prefill, decode steps and closing batches (`seconds`), and how
    many of each (`calls`), for benchmarks. On CUDA a span is timed on the device's stream (an
    event at each end): it is charged the device's time from the work before it to its own
    last kernel, and host work beside it (the stop checks, which overlap the next step) is not
    charged to it. Elsewhere a span is the host's time."""

    def __init__(self):
        self.totals = {"prefill": 0.0, "decode": 0.0, "end": 0.0}
        self.calls = dict.fromkeys(self.totals, 0)
        self.spans = []  # (phase, start event, end event) not yet read

    @contextmanager
    def __call__(self, phase: str, device: torch.device):
        if device.type != "cuda":
            start = time.perf_counter()
            yield
            self.totals[phase] += time.perf_counter() - start
        else:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            yield
            end.record()
            self.spans.append((phase, start, end))
        self.calls[phase] += 1

    @property
    def seconds(self) -> dict[str, float]:
        """Seconds per phase so far (waits for the device to run the spans it was given)."""
        for phase, start, end in self.spans:
            end.synchronize()
            self.totals[phase] += start.elapsed_time(end) / 1e3
        self.spans.clear()
        return dict(self.totals)


def backend(cfg: RunConfig, device: torch.device) -> str:
    """The runtime a run gets: `model.backend`, where `auto` is the device one on CUDA (the
    reference keeps traces and Belady's cache, which need every request on the host)."""
    if cfg.model.backend != "auto":
        return cfg.model.backend
    host_only = cfg.trace or cfg.cache.eviction not in EVICTIONS
    return "tensor" if device.type == "cuda" and not host_only else "python"


def cache_kw(model) -> str:
    """The forward argument that takes the KV cache (transformers renamed past_key_values to
    cache during 5.x)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def static_kv(model) -> bool:
    """Whether the static KV cache serves this model: every layer full attention (sliding
    windows, linear attention and state-space layers keep transformers' own caches)."""
    c = model.config
    layers = getattr(c, "layer_types", None) or ["full_attention"] * c.num_hidden_layers
    return all(t == "full_attention" for t in layers)


def left_pad(prompts, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one batch, left-padded with `pad`: (ids [B, S], mask [B, S], 1 at a
    prompt's tokens)."""
    s = max(map(len, prompts))
    ids = torch.full((len(prompts), s), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), s), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, s - len(p) :] = torch.tensor(p)
        mask[i, s - len(p) :] = 1
    return ids, mask


def _to_host(t: torch.Tensor):
    """A copy of `t` on its way to the host, without waiting for the device: call the result
    for it as a numpy array (it then waits for the copy alone)."""
    if not t.is_cuda:
        host = t.numpy().copy()
        return lambda: host
    host = t.to("cpu", non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return lambda: (done.synchronize(), host.numpy())[1]


def _cut(text: str, stop) -> str:
    cut = min([text.find(s) for s in stop if s in text] or [len(text)])
    return text[:cut]


# --- KV caches --------------------------------------------------------------------------------


class DynamicKV:
    """transformers' DynamicCache, grown every step, and its own masks: any family (sliding
    windows, linear attention and state-space layers get their own kind of cache from the
    config), any device."""

    def __init__(self, model, cache_kw: str, rows: int, max_len: int):
        self.model, self.cache_kw = model, cache_kw
        self.kv = DynamicCache(config=model.config)
        self.mask = None

    def pieces(self, rows: int, s: int) -> list[tuple[int, int]]:
        """The prompt positions of each prefill forward pass: one (transformers' caches of
        other layer kinds need the whole prompt at once)."""
        return [(0, s)]

    def prefill(self, ids, mask, pos) -> torch.Tensor:
        """The prompts (or, after earlier pieces, their next positions `ids`): `mask` [B, keys
        so far] marks the real tokens."""
        self.mask = mask
        return self._forward(ids, pos)

    def step(self, tokens, pos) -> torch.Tensor:
        ones = torch.ones((len(tokens), 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], 1)
        return self._forward(tokens[:, None], pos[:, None])

    def _forward(self, ids, pos) -> torch.Tensor:
        out = self.model(
            input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True,
            output_router_logits=False, **{self.cache_kw: self.kv},
        )  # fmt: skip
        return out.logits[:, -1].float()


class StaticKV:
    """A KV cache preallocated for the batch (transformers' StaticCache) with the simulator's
    own attention masks, built from which slots hold a row's tokens: every decode step has the
    same shapes and no host synchronisation, so it can be captured and replayed. A prefill
    piece's attention sees the slots up to the piece's end only (`_Prefix`): the later ones
    hold nothing yet."""

    def __init__(self, model, cache_kw: str, rows: int, max_len: int):
        self.model, self.cache_kw = model, cache_kw
        device = next(model.parameters()).device
        self.kv = _Prefix(config=model.config, max_cache_len=max_len)
        self.valid = torch.zeros((rows, max_len), dtype=torch.bool, device=device)
        self.slot = torch.zeros((), dtype=torch.long, device=device)  # the next token's slot
        self.keys = torch.arange(max_len, device=device)
        self.zero = torch.zeros((), dtype=model.dtype, device=device)
        self.blocked = torch.full(
            (), torch.finfo(model.dtype).min, dtype=model.dtype, device=device
        )

    def _mask(self, query_slots: torch.Tensor, slots: int):
        """An additive [B, 1, Q, slots] mask over the first `slots` slots: each query attends
        to its row's tokens so far."""
        keys = self.keys[:slots]
        allowed = self.valid[:, None, :slots] & (keys <= query_slots[:, None])[None]
        # A 4D mask is taken as given by transformers' mask functions (and every layer is
        # full attention here).
        return torch.where(allowed[:, None], self.zero, self.blocked)

    def pieces(self, rows: int, s: int) -> list[tuple[int, int]]:
        step = max(1, PREFILL_TOKENS // rows)
        return [(a, min(a + step, s)) for a in range(0, s, step)]

    def prefill(self, ids, mask, pos) -> torch.Tensor:
        end = mask.shape[1]
        self.valid[:, :end] = mask.bool()
        self.slot.fill_(end)
        with self.kv.up_to(end), sdpa_kernel(PREFILL_ATTENTION):
            out = self.model(
                input_ids=ids, position_ids=pos,
                attention_mask=self._mask(self.keys[end - ids.shape[1] : end], end),
                use_cache=True, logits_to_keep=1, output_router_logits=False,
                **{self.cache_kw: self.kv},
            )  # fmt: skip
        return out.logits[:, -1].float()

    def step(self, tokens, pos) -> torch.Tensor:
        slot = self.slot.view(1)
        self.valid.index_fill_(1, slot, True)
        out = self.model(
            input_ids=tokens[:, None], attention_mask=self._mask(slot, len(self.keys)),
            position_ids=pos[:, None],
            use_cache=True, logits_to_keep=1, output_router_logits=False,
            **{self.cache_kw: self.kv},
        )  # fmt: skip
        self.slot += 1
        return out.logits[:, -1].float()


class _Prefix(StaticCache):
    """transformers' StaticCache whose layers hand attention their first `visible` slots only
    (None: all of them; `up_to`)."""

    visible: int | None = None

    @contextmanager
    def up_to(self, slots: int):
        """Within: attention sees the first `slots` slots."""
        self.visible = slots
        try:
            yield
        finally:
            self.visible = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.visible is None:
            return keys, values
        return keys[:, :, : self.visible], values[:, :, : self.visible]


class Captured:
    """A step function run eagerly on its first call (lazy initialisation, kernel compilation;
    a real step), captured as a CUDA graph on its second, and replayed from then on. The
    function reads and writes only tensors that outlive it."""

    def __init__(self, fn):
        self.fn, self.graph, self.warm = fn, None, False

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if not self.warm:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.fn()
            torch.cuda.current_stream().wait_stream(side)
            self.warm = True
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # recorded, not run
            self.fn()
        self.graph = graph
        graph.replay()
