"""One run end to end: a model, a cache, a precision policy and a task -> a flat metrics dict.

`run(cfg)` is a pure function of the resolved config (and its seed). `load(cfg)` does the heavy
part (reading and quantizing the model) so that a process serving many runs of one model (a
sweep worker) loads it once per `load_key`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from slicemoe.cache import SliceCache
from slicemoe.config import PrefetchConfig, RunConfig
from slicemoe.metrics import COL, COST_COUNTERS, COUNTERS, METRICS, assemble, stats_row
from slicemoe.models import Shape, checkpoint_dir, gate_rule, model_dims, moe_blocks, read_shape
from slicemoe.models.adapter import Runtime, footprint, install, quantize_model, router_logits
from slicemoe.prefetch import NextGate, make_predictor
from slicemoe.quant import reference_bytes
from slicemoe.replay import miss_ratio_curve, replay
from slicemoe.stream import Recorder, Stream, replayable, stream_key
from slicemoe.trace import write_trace
from slicemoe.validate import ConfigError, capacity_bytes, get_task_or_error, validate
from slicemoe.warmup import apply_warmup

# The runner API of the sweep (sweep.jobs.RUNNER_API), and what tests and notebooks import.
__all__ = [
    "METRICS",
    "ConfigError",
    "capacity_bytes",
    "load",
    "load_key",
    "miss_ratio_curve",
    "record",
    "replay",
    "replayable",
    "run",
    "stream_key",
    "validate",
]


# --- loading ---------------------------------------------------------------------------------


@dataclass
class Loaded:
    key: str
    model: object
    tokenizer: object
    shape: Shape
    device: torch.device


def load_key(cfg: RunConfig) -> str:
    return json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.bits)], sort_keys=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load(cfg: RunConfig) -> Loaded:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint_dir(cfg.model.name, cfg.model.path)
    device = _device(cfg.model.device)
    tok = AutoTokenizer.from_pretrained(path)
    # Never a pickle checkpoint (validate refuses them too).
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, cfg.model.dtype), use_safetensors=True
    )
    model = model.to(device).eval()
    quantize_model(model, cfg.bits)
    return Loaded(load_key(cfg), model, tok, read_shape(path), device)


# --- simulation ------------------------------------------------------------------------------


def _batches(items, n):
    for i in range(0, len(items), n):
        yield i, items[i : i + n]


def _counters(rt: Runtime) -> np.ndarray:
    """The cumulative decode COUNTERS of the runtime's current batch, all devices summed."""
    v = np.zeros(len(COUNTERS))
    for st in rt.seqs:
        v += stats_row(st.cache.stats)
        v[COL["expert_calls"]] += st.expert_calls
        v[COL["highbit_calls"]] += st.highbit_calls
        v[COL["tokens"]] += st.decode_tokens
        v[COL["resident_sum"]] += st.resident_sum
        v[COL["predicted_calls"]] += st.predicted_calls.sum()
        v[COL["covered_calls"]] += st.covered_calls.sum()
    for name in COST_COUNTERS:
        v[COL[name]] = getattr(rt.cost["decode"], name)
    return v


class _Simulator:
    """Runs batches of sequences through prefill, warmup and decode with the runtime in the loop."""

    def __init__(self, cfg: RunConfig, loaded: Loaded):
        self.cfg, self.loaded = cfg, loaded
        self.model = loaded.model
        self.dims = model_dims(loaded.model)
        fp = footprint(self.dims, loaded.shape, cfg.bits, cfg.hardware)
        self.fp = fp
        gate = gate_rule(loaded.model.config)
        blocks = moe_blocks(loaded.model)

        def logits(layer, hidden):
            return router_logits(blocks[layer], hidden)

        predictor = make_predictor(cfg.prefetch, gate.top_k, len(blocks))
        self.recorder = Recorder(loaded.shape)
        # One ranking per layer step serves both the stream and next_gate (which may read
        # deeper than the stream records).
        depth = max(self.recorder.depth, cfg.prefetch.top_m)
        ranker = NextGate(gate, logits, len(blocks), depth, cfg.policy.tau)
        self.rt = Runtime(gate, fp, cfg.policy, cfg.hardware, predictor, cfg.prefetch, ranker)
        install(loaded.model, self.rt)
        # Per MoE layer, summed over sequences: expert calls predicted for, and covered.
        self.layer_predicted = np.zeros(loaded.shape.num_moe_layers)
        self.layer_covered = np.zeros(loaded.shape.num_moe_layers)
        self.capacity = capacity_bytes(cfg, loaded.shape)
        self.traces = []
        # step_rows[t]: COUNTERS of decode step t, summed over every device of every batch.
        self.step_rows: list[np.ndarray] = []
        self.warmup_bytes = 0
        # transformers renamed the KV-cache argument (past_key_values -> cache) during 5.x.
        params = inspect.signature(loaded.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        tok = loaded.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def _caches(self, n: int):
        shape = self.loaded.shape
        caches = []
        for _ in range(n):
            c = SliceCache(
                self.capacity,
                self.fp.sizes,
                shape.num_moe_layers,
                shape.num_experts,
                self.cfg.cache.eviction,
            )
            c.trace = [] if self.cfg.trace else None
            c.counting = False  # statistics are decode statistics
            caches.append(c)
        return caches

    def _tally(self, t: int, delta: np.ndarray) -> None:
        while len(self.step_rows) <= t:
            self.step_rows.append(np.zeros(len(COUNTERS)))
        self.step_rows[t] += delta

    def rows(self) -> np.ndarray:
        return np.array(self.step_rows).reshape(-1, len(COUNTERS))

    @torch.no_grad()
    def batch(self, first_seq, prompts, forced=None, max_new=0, stop=(), eos=None):
        """Prefill `prompts` (token lists), then decode. With `forced` (token lists to score),
        decode is teacher-forced and the NLL of each forced token is returned; otherwise decode
        is greedy until a stop string / eos / max_new tokens and the texts (cut at the first stop
        string) are returned."""
        cfg, rt, dev = self.cfg, self.rt, self.loaded.device
        b = len(prompts)
        caches = self._caches(b)
        lens = torch.tensor([len(p) for p in prompts])
        s = int(lens.max())
        ids = torch.full((b, s), self.pad, dtype=torch.long)
        mask = torch.zeros((b, s), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, s - len(p) :] = torch.tensor(p)
            mask[i, s - len(p) :] = 1
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        for i, c in enumerate(caches):
            c.tag = (first_seq + i, "prefill", -1)
        rt.start(caches, mask.bool())
        # Filled in place by every forward; the config gives each layer its kind of cache
        # (sliding window, linear-attention or SSM state).
        kv = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids.to(dev),
            attention_mask=mask.to(dev),
            position_ids=pos.to(dev),
            use_cache=True,
            output_router_logits=False,
            **{self.cache_kw: kv},
        )
        rt.head(np.ones(b, dtype=np.int64))
        logits = out.logits[:, -1].float()
        kind = "MSB" if rt.sliced else "FULL"
        fills = np.zeros(b)
        for i, st in enumerate(rt.seqs):
            # Seeded per sequence, so a sequence warms up alike in any batch.
            rng = np.random.default_rng([cfg.seed, first_seq + i])
            fills[i] = apply_warmup(cfg.policy.warmup, st.cache, st.counts, kind, rng)
        rt.fill(fills)
        self.warmup_bytes += fills.sum()

        steps = max(len(f) for f in forced) if forced is not None else max_new
        active = np.ones(b, dtype=bool)
        context = lens.numpy().copy()
        nll = [[] for _ in range(b)]
        gen = [[] for _ in range(b)]
        texts = ["" for _ in range(b)]
        tok = self.loaded.tokenizer
        next_pos = pos[:, -1] + 1
        for t in range(steps):
            # Choose this step's input token per row, and retire rows that are done.
            logp = torch.log_softmax(logits, -1).cpu()
            step_tokens = torch.full((b,), self.pad, dtype=torch.long)
            for i in range(b):
                if not active[i]:
                    continue
                if forced is not None:
                    if t >= len(forced[i]):
                        active[i] = False
                        continue
                    step_tokens[i] = forced[i][t]
                    nll[i].append(-float(logp[i, forced[i][t]]))
                else:
                    nxt = int(logp[i].argmax())
                    gen[i].append(nxt)
                    if stop:
                        texts[i] = tok.decode(gen[i])
                    if nxt == eos or any(x in texts[i] for x in stop):
                        active[i] = False
                        continue
                    step_tokens[i] = nxt
            if not active.any() or (forced is None and t == steps - 1):
                break
            for i, c in enumerate(caches):
                c.counting = True
                c.tag = (first_seq + i, "decode", t)
            before = _counters(rt)
            rt.begin_step(t, active, context)
            mask = torch.cat([mask, torch.ones(b, 1, dtype=torch.long)], 1)
            out = self.model(
                input_ids=step_tokens.view(b, 1).to(dev),
                attention_mask=mask.to(dev),
                position_ids=next_pos.view(b, 1).to(dev),
                use_cache=True,
                **{self.cache_kw: kv},
                output_router_logits=False,
            )
            rt.head(active.astype(np.int64))
            self._tally(t, _counters(rt) - before)
            logits = out.logits[:, -1].float()
            next_pos = next_pos + 1
            context += active
        for i, st in enumerate(rt.seqs):
            if st.cache.trace is not None:
                self.traces.append(st.cache.trace)
            n = int(lens[i])
            self.recorder.add(
                first_seq + i,
                n,
                st.counts,
                st.chosen,
                st.requested_high,
                st.next_gate,
                st.next_gate_critical,
            )
            self.layer_predicted += st.predicted_calls
            self.layer_covered += st.covered_calls
        if forced is not None:
            return nll
        return [_cut(t, stop) for t in texts]


def _cut(text: str, stop) -> str:
    cut = min([text.find(s) for s in stop if s in text] or [len(text)])
    return text[:cut]


def _evaluate(cfg: RunConfig, loaded: Loaded):
    """The model pass: (the simulator with its meters, task scores, prompt tokens)."""
    task = get_task_or_error(cfg.eval.task)
    sim = _Simulator(cfg, loaded)
    tok = loaded.tokenizer
    scores: dict[str, list] = {}
    prefill_tokens = 0
    if task.kind == "generate":
        docs = task.docs(cfg.eval, tok)
        for start, chunk in _batches(docs, cfg.batch_size):
            prompts = [tok(d.prompt)["input_ids"] for d in chunk]
            texts = sim.batch(
                start,
                prompts,
                max_new=cfg.eval.max_new_tokens,
                stop=task.stop,
                eos=tok.eos_token_id,
            )
            for d, text in zip(chunk, texts):
                for k, v in task.score(d, text).items():
                    scores.setdefault(k, []).append(v)
            prefill_tokens += sum(len(p) for p in prompts)
    else:
        windows = task.windows(cfg.eval, tok)
        nlls = []
        for start, chunk in _batches(windows, cfg.batch_size):
            prompts = [w.input_ids[: max(w.n_context, 1)] for w in chunk]
            forced = [w.input_ids[max(w.n_context, 1) :] for w in chunk]
            for row in sim.batch(start, prompts, forced=forced):
                nlls.extend(row)
            prefill_tokens += sum(len(p) for p in prompts)
        scores["perplexity"] = [math.exp(float(np.mean(nlls)))] if nlls else [float("nan")]
    return sim, {k: float(np.mean(v)) for k, v in scores.items()}, prefill_tokens


def _prepare(cfg: RunConfig, loaded: Loaded | None) -> Loaded:
    validate(cfg)
    if loaded is None:
        return load(cfg)
    if loaded.key != load_key(cfg):
        raise ValueError("`loaded` was made for another model/bits config; call load(cfg)")
    return loaded


def record(cfg: RunConfig, loaded: Loaded | None = None) -> Stream:
    """One model pass of a replayable config -> its request stream (slicemoe.stream)."""
    loaded = _prepare(cfg, loaded)
    if not replayable(cfg):
        raise ValueError(
            "this config's requests depend on the cache (cache-aware routing, lsb_miss=skip or "
            "a miss-rate target): run it with the model in the loop, slicemoe.run.run"
        )
    # The stream does not depend on the cache or the prefetcher; any in-loop eviction records it.
    cfg = dataclasses.replace(
        cfg, cache=dataclasses.replace(cfg.cache, eviction="lru"), prefetch=PrefetchConfig()
    )
    torch.manual_seed(cfg.seed)
    sim, scores, _ = _evaluate(cfg, loaded)
    return sim.recorder.stream(stream_key(cfg), dataclasses.asdict(cfg), sim.dims, scores)


def run(cfg: RunConfig, loaded: Loaded | None = None) -> dict:
    """Metrics (slicemoe.metrics.METRICS) of one run, plus "curves" and "trace_path".

    Belady's oracle and the oracle prefetcher need the future: the model pass records the
    request stream, and the replay reads it (slicemoe.replay)."""
    t0 = time.time()
    loaded = _prepare(cfg, loaded)
    if cfg.cache.eviction == "belady" or cfg.prefetch.predictor == "oracle":
        result = replay(record(cfg, loaded), cfg)
        result["wall_s"] = time.time() - t0
        return result
    torch.manual_seed(cfg.seed)
    sim, scores, prefill_tokens = _evaluate(cfg, loaded)
    result = assemble(
        cfg,
        sim.rows(),
        sim.rt.cost["prefill"],
        sim.warmup_bytes,
        prefill_tokens,
        scores,
        sim.capacity,
        sim.fp.sizes["FULL"],
        reference_bytes(loaded.shape.expert_params),
        (sim.layer_predicted, sim.layer_covered),
    )
    result["trace_path"] = write_trace(cfg, sim.traces) if cfg.trace else None
    if cfg.trace:  # the run's requests, compactly, next to the trace (slicemoe.stream)
        stream = sim.recorder.stream(stream_key(cfg), dataclasses.asdict(cfg), sim.dims, scores)
        result["stream_path"] = str(stream.save(Path(result["trace_path"]).with_suffix(".npz")))
    result["wall_s"] = time.time() - t0
    return result
