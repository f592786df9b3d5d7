"""The request stream: what one model pass leaves for the cache and the hardware model.

With top-k routing, `on_miss=fetch` and no miss-rate controller, which experts a token uses
and at which precision do not depend on the cache. One model pass then determines every
request a device makes; cache size, eviction, warmup and hardware only decide which requests
hit and what they cost. A `Stream` records, per sequence (one simulated device):
- the prompt length and the prefill routing counts per layer and expert (prefill streams each
  used expert once per layer; PCW ranks by these counts);
- per decode step and MoE layer, the k chosen experts and whether each requested its high-bit
  path (the decode context of step t is the prompt length + t);
- the task scores per problem, the model's shape and the dimensions the hardware model charges.
`slicemoe.replay.replay(stream, cfg)` turns it into the metrics that `slicemoe.run.run(cfg)`
computes with the model in the loop.

With cache-aware routing (or misses not fetched, or a miss-rate target) the requests depend on
the cache, but on nothing that only bills them: a pass recorded with the model, cache, policy and
prefetcher in the loop replays exactly under every hardware profile.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slicemoe.config import RunConfig
from slicemoe.models import Dims, Shape

SCHEMA_VERSION = 3  # 3: scores per problem
ARRAYS = (
    "prompt_len", "prefill_counts", "decode_steps", "experts", "high", "next_gate",
    "next_gate_critical",
)  # fmt: skip
# How many of the next layer's experts the pre-gating predictor's ranking is recorded for: a
# replay can prefetch by next_gate with prefetch.top_m up to this.
NEXT_GATE_DEPTH = 16

# What only bills the requests, or labels or places the run: a replay recomputes the bills for
# any value, so no stream depends on it.
BILLING = {
    "hardware": None,  # every field
    "model": ("device", "backend"),
    "trace": None,
    "trace_path": None,
    "cache": ("name",),
    "policy": ("name",),
    "prefetch": ("name",),
}
# What the stream of a cache-independent config does not depend on either (replay recomputes
# it): the cache, the warmup and the measurement window, the routing knobs top-k does not read,
# the prefetcher.
NOT_IN_STREAM = {
    **BILLING,
    "cache": None,
    "policy": ("name", "warmup", "warmup_steps", "lam", "lam_scale", "cumsum_p", "max_rank_keep",
               "max_rank_m", "miss_rate_target", "drop_below"),
    "prefetch": None,
}  # fmt: skip


def replayable(cfg: RunConfig) -> bool:
    """True when a recorded stream holds every request of `cfg`. A cache-independent config
    shares the stream of any config with the same model, bits, precision and task; any other
    (cache-aware routing, policy.on_miss=skip_lsb or substitute, a miss-rate target) replays the
    stream recorded with its own cache, policy and prefetcher in the loop, so only the billing
    settings (the hardware profile) vary across one pass's replays. Not replayable: see
    `not_replayable`."""
    return not_replayable(cfg) is None


def not_replayable(cfg: RunConfig) -> str | None:
    """Why a recorded stream does not hold every request of `cfg`, or None when it does."""
    f = cfg.prefetch
    if f.predictor == "next_gate" and f.top_m > NEXT_GATE_DEPTH:
        return (
            f"prefetch.top_m={f.top_m}: a request stream keeps the next-gate ranking to depth "
            f"{NEXT_GATE_DEPTH}"
        )
    if cfg.policy.on_miss == "drop":
        return (
            "policy.on_miss=drop: which missed experts it drops depends on their gate weights, "
            "which a request stream does not keep"
        )
    return None


def cache_independent(cfg: RunConfig) -> bool:
    """The requests of a run do not depend on its cache: the same in any recorded pass."""
    p = cfg.policy
    return p.routing == "topk" and p.on_miss == "fetch" and p.miss_rate_target is None


def stream_key(cfg: RunConfig) -> str:
    """Configs with one key share one request stream (and one model pass)."""
    data = dataclasses.asdict(cfg)
    for section, names in (NOT_IN_STREAM if cache_independent(cfg) else BILLING).items():
        if names is None:
            data.pop(section)
        else:
            for name in names:
                data[section].pop(name)
    # The schema is part of the key: a stream stored by an older version is not looked up.
    blob = json.dumps([SCHEMA_VERSION, data], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stream:
    key: str  # stream_key of the config that recorded it
    config: dict  # that config, for the record
    shape: Shape
    dims: Dims
    scores: dict  # task metric -> per-problem values (accuracy, ...) or [perplexity]
    prompt_len: np.ndarray  # [S] prompt tokens per sequence
    prefill_counts: np.ndarray  # [S, layers, experts] prefill tokens routed to each expert
    decode_steps: np.ndarray  # [S] decode forward passes per sequence
    experts: np.ndarray  # [sum(decode_steps), layers, k] chosen experts
    high: np.ndarray  # [sum(decode_steps), layers, k] high-bit path requested
    # Layer l+1's router on layer l's MoE input (slicemoe.prefetch.NextGate): its best experts,
    # best first ([..., layers, depth], -1 past the last layer), and DBSC's critical flags of
    # its top-k ([..., layers, k]).
    next_gate: np.ndarray
    next_gate_critical: np.ndarray

    @property
    def num_sequences(self) -> int:
        return len(self.prompt_len)

    @functools.cached_property
    def _starts(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.decode_steps)])

    def sequence(self, s: int):
        """(prompt length, prefill counts [L, E], experts [T, L, k], high [T, L, k]) of s."""
        start, end = int(self._starts[s]), int(self._starts[s + 1])
        return (
            int(self.prompt_len[s]),
            self.prefill_counts[s],
            self.experts[start:end],
            self.high[start:end],
        )

    def next_gate_of(self, s: int):
        """(ranked experts [T, L, depth], critical [T, L, k]) of sequence s."""
        start, end = int(self._starts[s]), int(self._starts[s + 1])
        return self.next_gate[start:end], self.next_gate_critical[start:end]

    def save(self, path: str | Path) -> Path:
        meta = {
            "schema_version": SCHEMA_VERSION,
            "key": self.key,
            "config": self.config,
            "shape": dataclasses.asdict(self.shape),
            "dims": dataclasses.asdict(self.dims),
            "scores": self.scores,
        }
        path = Path(path)
        with open(path, "wb") as f:
            arrays = {name: getattr(self, name) for name in ARRAYS}
            np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
        return path

    @classmethod
    def load(cls, path: str | Path | bytes) -> Stream:
        """From a file, or from its bytes."""
        data = np.load(io.BytesIO(path if isinstance(path, bytes) else Path(path).read_bytes()))
        meta = json.loads(str(data["meta"]))
        if meta.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"{path}: request stream schema {meta.get('schema_version')} is not "
                f"{SCHEMA_VERSION}; record it again (sweep.replay=false runs the model)"
            )
        return cls(
            key=meta["key"],
            config=meta["config"],
            shape=Shape(**meta["shape"]),
            dims=Dims(**meta["dims"]),
            scores=meta["scores"],
            **{name: data[name] for name in ARRAYS},
        )


class Recorder:
    """Collects the stream of one model pass, sequence by sequence, in any batch order."""

    def __init__(self, shape: Shape):
        self.shape = shape
        self.depth = min(NEXT_GATE_DEPTH, shape.num_experts)
        self.seqs: dict[int, dict] = {}

    def add(self, seq: int, prompt_len: int, counts, chosen, high, gate, gate_critical) -> None:
        """Per decode step and layer (flattened, step-major): `chosen` [k] experts, `high` [k]
        flags, `gate` the next-gate ranking (its first `depth` are kept), `gate_critical` [k]
        flags."""
        layers, k = self.shape.num_moe_layers, self.shape.top_k
        steps = len(chosen) // layers
        dtype = np.int16 if self.shape.num_experts < 2**15 else np.int32
        gate = np.array(gate, dtype=dtype)  # rankings may run deeper than the stream keeps
        self.seqs[seq] = {
            "prompt_len": prompt_len,
            "prefill_counts": counts,
            "experts": np.array(chosen, dtype=dtype).reshape(steps, layers, k),
            "high": np.array(high, bool).reshape(steps, layers, k),
            "next_gate": (gate[:, : self.depth] if steps else gate).reshape(
                steps, layers, self.depth
            ),
            "next_gate_critical": np.array(gate_critical, bool).reshape(steps, layers, k),
        }

    def stream(self, key: str, config: dict, dims: Dims, scores: dict) -> Stream:
        order = sorted(self.seqs)
        if order != list(range(len(order))):
            raise ValueError("sequences are missing from the recorded stream")
        seqs = [self.seqs[s] for s in order]
        layers, k = self.shape.num_moe_layers, self.shape.top_k
        empty = {
            "experts": np.zeros((0, layers, k), np.int16),
            "high": np.zeros((0, layers, k), bool),
            "next_gate": np.zeros((0, layers, self.depth), np.int16),
            "next_gate_critical": np.zeros((0, layers, k), bool),
        }
        per_step = {
            name: np.concatenate([q[name] for q in seqs]) if seqs else zeros
            for name, zeros in empty.items()
        }
        return Stream(
            key=key,
            config=config,
            shape=self.shape,
            dims=dims,
            scores=scores,
            prompt_len=np.array([q["prompt_len"] for q in seqs], dtype=np.int32),
            prefill_counts=np.stack([q["prefill_counts"] for q in seqs]).astype(np.int32),
            decode_steps=np.array([len(q["experts"]) for q in seqs], dtype=np.int32),
            **per_step,
        )
