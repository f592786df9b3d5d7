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
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from slicemoe.cache import EVICTION, SliceCache
from slicemoe.config import RunConfig
from slicemoe.eval import TASKS, get_task
from slicemoe.metrics import COL, COUNTERS, KINDS, METRICS, assemble
from slicemoe.models import Shape, gate_rule, read_shape, resolve_path
from slicemoe.models.adapter import Runtime, footprint, install, model_dims, quantize_model
from slicemoe.quant import reference_bytes, slice_bytes
from slicemoe.routing import ROUTING
from slicemoe.stream import Recorder, Stream
from slicemoe.warmup import WARMUP, apply_warmup

__all__ = [
    "METRICS",
    "ConfigError",
    "capacity_bytes",
    "load",
    "load_key",
    "record",
    "run",
    "validate",
]


class ConfigError(ValueError):
    """A config value that cannot work; `field` is its dotted name."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


# --- validation ------------------------------------------------------------------------------


def validate(cfg: RunConfig) -> None:
    """Fail before any work with a message naming the field and the fix."""
    b, p, c, e = cfg.bits, cfg.policy, cfg.cache, cfg.eval
    if b.high is not None and not 2 <= b.high <= 8:
        raise ConfigError("bits.high", f"{b.high} is out of range; use 2..8 or null for fp16")
    if b.low is not None:
        if b.high is None:
            raise ConfigError("bits.low", "slicing needs quantized experts; set bits.high too")
        if not 1 <= b.low < b.high:
            raise ConfigError("bits.low", f"low bits {b.low} must be below bits.high={b.high}")
    if b.scheme not in ("amat", "trunc", "base"):
        raise ConfigError("bits.scheme", f"{b.scheme!r} is unknown; use amat, trunc or base")
    if b.group < 1:
        raise ConfigError("bits.group", "must be a positive divisor of the input dims")
    if p.routing not in ROUTING:
        raise ConfigError(
            "policy.routing", f"{p.routing!r} is unknown; use one of {sorted(ROUTING)}"
        )
    if p.precision not in ("high", "low", "dbsc"):
        raise ConfigError("policy.precision", f"{p.precision!r} is unknown; use high, low or dbsc")
    if p.precision != "high" and b.low is None:
        raise ConfigError(
            "policy.precision",
            f"{p.precision} needs Matryoshka bits (bits.low); pick bits=mat84/mat63/mat42",
        )
    if p.warmup not in WARMUP:
        raise ConfigError("policy.warmup", f"{p.warmup!r} is unknown; use one of {sorted(WARMUP)}")
    if p.lsb_miss not in ("fetch", "skip"):
        raise ConfigError("policy.lsb_miss", f"{p.lsb_miss!r} is unknown; use fetch or skip")
    if p.lsb_miss == "skip" and b.scheme == "base":
        raise ConfigError(
            "policy.lsb_miss",
            "skip needs nested slices; bits.scheme=base keeps two whole copies (no LSB slice): "
            "use policy.lsb_miss=fetch or bits.scheme=amat",
        )
    if not p.tau >= 0:  # also refuses NaN
        raise ConfigError("policy.tau", f"{p.tau} must be a number >= 0 (0: all high-bit)")
    if p.lam_scale not in ("token", "running"):
        raise ConfigError("policy.lam_scale", f"{p.lam_scale!r} is unknown; use token or running")
    if p.miss_rate_target is not None and p.routing != "cache_prior":
        raise ConfigError(
            "policy.miss_rate_target",
            "the online controller adapts cache_prior's lambda; set policy.routing=cache_prior",
        )
    if p.warmup_steps < 0:
        raise ConfigError("policy.warmup_steps", "must be >= 0")
    if c.eviction not in EVICTION:
        raise ConfigError(
            "cache.eviction", f"{c.eviction!r} is unknown; use one of {sorted(EVICTION)}"
        )
    if c.eviction == "belady":
        # The oracle replays a recorded request sequence, so requests must not depend on the
        # cache, and warmup must not insert (an insert is not a request of that sequence).
        if p.routing != "topk" or p.lsb_miss != "fetch" or p.warmup in ("random", "pcw"):
            raise ConfigError(
                "cache.eviction",
                "belady needs cache-independent requests: policy.routing=topk, "
                "policy.lsb_miss=fetch and a warmup that inserts nothing (lru/empty/last_layer)",
            )
    if (c.frac is None) == (c.bytes is None):
        raise ConfigError("cache", "set exactly one of cache.frac and cache.bytes (the other null)")
    if c.frac is not None and not c.frac > 0:
        raise ConfigError(
            "cache.frac", f"{c.frac} must be > 0 (a share of all routed experts at 8 bits)"
        )
    if cfg.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError("model.dtype", "use float32, bfloat16 or float16")
    try:
        shape = read_shape(cfg.model.path)
    except FileNotFoundError as err:
        raise ConfigError("model.path", str(err)) from None
    sizes = expert_sizes(cfg, shape)
    need = max(sizes["MSB"], sizes["FULL"] if p.precision == "high" else 0)
    if capacity_bytes(cfg, shape) < need:
        raise ConfigError(
            "cache",
            f"capacity {capacity_bytes(cfg, shape):,} B is below one expert slice ({need:,} B); "
            "raise cache.frac or cache.bytes",
        )
    get_task_or_error(e.task)
    if e.data_path is not None and not Path(e.data_path).exists():
        raise ConfigError("eval.data_path", f"{e.data_path} does not exist; point it at the data")
    if e.task != "arith" and e.data_path is None:
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError(
                "eval.data_path",
                f"task {e.task} needs local data (no `datasets` here): set eval.data_path",
            ) from None
    if e.limit is not None and e.limit < 1:
        raise ConfigError("eval.limit", "must be >= 1 or null for all documents")
    if e.max_new_tokens < 1:
        raise ConfigError("eval.max_new_tokens", "must be >= 1")
    if e.num_fewshot < 0:
        raise ConfigError("eval.num_fewshot", "must be >= 0")
    if cfg.batch_size < 1:
        raise ConfigError("batch_size", "must be >= 1")


def get_task_or_error(name: str):
    try:
        return get_task(name)
    except ValueError:
        raise ConfigError("eval.task", f"{name!r} is unknown; use one of {sorted(TASKS)}") from None


def expert_sizes(cfg: RunConfig, shape: Shape) -> dict:
    b = cfg.bits
    return slice_bytes(shape.expert_params, b.high, b.low, b.group, b.symmetric)


def capacity_bytes(cfg: RunConfig, shape: Shape) -> int:
    """DRAM bytes for routed-expert slices: cache.bytes, or cache.frac of all routed experts at
    the 8-bit reference size (the same bytes for every bit width)."""
    if cfg.cache.bytes is not None:
        return int(cfg.cache.bytes)
    total = shape.num_moe_layers * shape.num_experts * reference_bytes(shape.expert_params)
    return int(cfg.cache.frac * total)


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

    path = resolve_path(cfg.model.path)
    device = _device(cfg.model.device)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, cfg.model.dtype))
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
        s = st.cache.stats
        for k in KINDS:
            v[COL[f"requests_{k}"]] += s.requests[k]
            v[COL[f"misses_{k}"]] += s.requests[k] - s.hits[k]
        v[COL["activations"]] += s.activations
        v[COL["expert_calls"]] += st.expert_calls
        v[COL["highbit_calls"]] += st.highbit_calls
        v[COL["tokens"]] += st.decode_tokens
        v[COL["resident_sum"]] += st.resident_sum
    cost = rt.cost["decode"]
    for name in ("ops", "dram_bytes", "flash_bytes", "compute_j", "dram_j", "flash_j"):
        v[COL[name]] = getattr(cost, name)
    v[COL["latency_s"]] = cost.latency_s
    return v


class _Simulator:
    """Runs batches of sequences through prefill, warmup and decode with the runtime in the loop."""

    def __init__(self, cfg: RunConfig, loaded: Loaded):
        self.cfg, self.loaded = cfg, loaded
        self.model = loaded.model
        self.dims = model_dims(loaded.model)
        fp = footprint(self.dims, loaded.shape, cfg.bits, cfg.hardware)
        self.fp = fp
        self.rt = Runtime(gate_rule(loaded.model.config), fp, cfg.policy, cfg.hardware)
        install(loaded.model, self.rt)
        self.capacity = capacity_bytes(cfg, loaded.shape)
        self.traces = []
        self.recorder = Recorder(loaded.shape)
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
        kv = DynamicCache()  # filled in place by every forward
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
            self.recorder.add(first_seq + i, n, st.counts, st.chosen, st.requested_high)
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
    from slicemoe.replay import replayable, stream_key

    loaded = _prepare(cfg, loaded)
    if not replayable(cfg):
        raise ValueError(
            "this config's requests depend on the cache (cache-aware routing, lsb_miss=skip or "
            "a miss-rate target): run it with the model in the loop, slicemoe.run.run"
        )
    # The stream does not depend on the cache; any in-loop eviction records it.
    cfg = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, eviction="lru"))
    torch.manual_seed(cfg.seed)
    sim, scores, _ = _evaluate(cfg, loaded)
    return sim.recorder.stream(stream_key(cfg), dataclasses.asdict(cfg), sim.dims, scores)


def run(cfg: RunConfig, loaded: Loaded | None = None) -> dict:
    """Metrics (slicemoe.metrics.METRICS) of one run, plus "curves" and "trace_path".

    Belady's oracle needs the future: the model pass records the request stream, and the
    oracle's cache replays it (slicemoe.replay)."""
    t0 = time.time()
    loaded = _prepare(cfg, loaded)
    if cfg.cache.eviction == "belady":
        from slicemoe.replay import replay

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
    )
    result["trace_path"] = write_trace(cfg, sim.traces) if cfg.trace else None
    result["wall_s"] = time.time() - t0
    return result


def write_trace(cfg: RunConfig, traces: list[list]) -> str:
    import pandas as pd

    cols = ["sequence", "phase", "step", "layer", "expert", "slice", "bytes", "hit"]
    rows = [r for t in traces for r in t]
    path = Path(
        cfg.trace_path or f"traces/trace-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.parquet"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=cols).to_parquet(path, index=False)
    return str(path)
