"""Request streams from router traces taken elsewhere, and recorded streams written as traces.

A trace is the open form of a request stream (docs/traces.md): one NPZ file of plain arrays
that any serving stack or published router log can be converted to, with no field of this
project's configs in it. `import_trace(path, model=...)` checks it against the model's shape
(its shipped or given config.json; no weights) and returns the `Stream` that `replay` reads,
for one precision policy: a trace's gate scores give DBSC's high-bit flags at any tau. A
missing optional field refuses, naming the field, exactly the settings that read it.

    python -m slicemoe.traces export <requests.npz | MLflow run id> <out.npz>

writes a recorded stream (the sweep's requests.npz artifact) as a trace.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

from slicemoe.config import ModelConfig, RunConfig
from slicemoe.models import config_dir, model_dims, read_shape, skeleton
from slicemoe.stream import NEXT_GATE_DEPTH, Stream, cache_independent, stream_key

FORMAT, VERSION = "slicemoe-trace", 1
REQUIRED = ("prompt_len", "decode_steps", "experts")
OPTIONAL = (
    "prefill_counts", "gate_scores", "high", "next_gate", "next_gate_scores", "next_gate_critical",
)  # fmt: skip
# The warmups that start from what prefill streamed through the cache: without prefill
# counts a trace has no prefill to stream.
PREFILL_WARMUPS = ("lru", "last_layer", "pcw")


class TraceError(ValueError):
    """A trace that does not match its format or its model's shape."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a trace holds, read without its arrays."""

    meta: dict
    fields: frozenset
    depth: int  # next-gate ranks per layer step (0 without next_gate)


@functools.lru_cache(maxsize=8)
def _header(path: str, mtime: float) -> Header:
    with np.load(path) as data:
        if "meta" not in data.files:
            raise TraceError(f"{path}: no `meta` (a JSON string); is it a {FORMAT} file?")
        meta = json.loads(str(data["meta"]))
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise TraceError(
                f"{path}: meta says format {meta.get('format')!r} version "
                f"{meta.get('version')!r}; this reads {FORMAT} version {VERSION} (docs/traces.md)"
            )
        missing = [name for name in REQUIRED if name not in data.files]
        if missing:
            raise TraceError(f"{path}: the required field(s) {', '.join(missing)} are missing")
        fields = frozenset(data.files) & frozenset(REQUIRED + OPTIONAL)
        # The ranking's depth, from the member's header alone (no array is read).
        depth = _npz_shape(data, "next_gate")[-1] if "next_gate" in fields else 0
    return Header(meta, fields, min(depth, NEXT_GATE_DEPTH))


def _npz_shape(data, name: str) -> tuple:
    fmt = np.lib.format
    with data.zip.open(f"{name}.npy") as f:
        read = (
            fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        )
        return read(f)[0]


def header(path: str | Path) -> Header:
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path} does not exist")
    return _header(str(path.resolve()), path.stat().st_mtime)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """The trace's content hash, once per version of the file."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


def check(cfg: RunConfig) -> None:
    """Refuse, naming the field, a setting of `cfg` that reads what its trace (cfg.stream_file)
    does not hold. Reads the trace's header only."""
    from slicemoe.validate import ConfigError  # validate calls this: imported when it runs

    try:
        h = header(cfg.stream_file)
    except (TraceError, OSError, ValueError) as err:
        raise ConfigError("stream_file", str(err)) from None
    has, p, f = h.fields, cfg.policy, cfg.prefetch
    if not cache_independent(cfg):
        raise ConfigError(
            "policy.routing",
            "a trace holds the experts a model chose, not its router logits: only top-k "
            "routing with policy.on_miss=fetch and no policy.miss_rate_target replays from it",
        )
    if p.precision == "dbsc" and "gate_scores" not in has and not _high_fits(h, cfg):
        recorded = h.meta.get("high_policy")
        raise ConfigError(
            "policy.precision",
            "dbsc needs the trace's gate_scores (or its high flags recorded at this "
            f"policy.tau; they were recorded for {recorded}): use policy.precision=high or low "
            "(every expert at one precision) or a trace with gate_scores",
        )
    if p.warmup in PREFILL_WARMUPS and "prefill_counts" not in has:
        raise ConfigError(
            "policy.warmup",
            f"{p.warmup} starts from what prefill streamed, and the trace has no "
            "prefill_counts: use policy.warmup=empty or random",
        )
    if f.predictor == "next_gate":
        m = f.top_m or read_shape(config_dir(cfg.model.name, cfg.model.path)).top_k
        if m > h.depth:
            raise ConfigError(
                "prefetch.predictor",
                f"next_gate prefetches the first {m} experts of the trace's next_gate ranking, "
                f"which has {h.depth}{'' if 'next_gate' in has else ' (no next_gate field)'}",
            )
        if f.slices == "critical" and not _critical_fits(h, cfg):
            raise ConfigError(
                "prefetch.slices",
                "critical needs the trace's next_gate_scores (or next_gate_critical recorded at "
                "this policy.tau): use prefetch.slices=msb",
            )


def _high_fits(h: Header, cfg: RunConfig) -> bool:
    """The trace's high flags were computed by this policy (precision and tau)."""
    recorded_for = {"precision": cfg.policy.precision, "tau": cfg.policy.tau}
    return "high" in h.fields and h.meta.get("high_policy") == recorded_for


def _critical_fits(h: Header, cfg: RunConfig) -> bool:
    return "next_gate_scores" in h.fields or (
        "next_gate_critical" in h.fields
        and h.meta.get("high_policy", {}).get("tau") == cfg.policy.tau
    )


def model_config(model: str) -> ModelConfig:
    """A conf/model name with a shipped config.json, or a folder holding a config.json."""
    if Path(model).is_dir():
        return ModelConfig(name=Path(model).name, path=str(model))
    return ModelConfig(name=model)


def import_trace(path: str | Path, model: str = "tiny", cfg: RunConfig | None = None) -> Stream:
    """The request stream of the trace at `path` for `cfg` (default: the defaults at `model`'s
    shape, a conf/model name or a folder with a config.json), keyed so that `replay(stream,
    c)` takes every config `c` with its stream key (any cache, warmup, eviction, hardware)."""
    if cfg is None:
        cfg = RunConfig(model=model_config(model))
    cfg = dataclasses.replace(cfg, stream_file=str(path))
    check(cfg)
    folder = config_dir(cfg.model.name, cfg.model.path)
    shape, dims = read_shape(folder), model_dims(skeleton(folder))
    h = header(path)
    with np.load(path) as data:
        arrays = {name: data[name] for name in h.fields}
    _check_arrays(arrays, shape, str(path))
    n, layers, k = arrays["experts"].shape
    p, tau = cfg.policy, cfg.policy.tau
    if p.precision != "dbsc":
        high = np.full((n, layers, k), p.precision == "high")
    elif "gate_scores" in arrays:
        high = arrays["gate_scores"] >= tau  # routing.critical's rule on normalised scores
    else:
        high = arrays["high"].astype(bool)
    if "next_gate_scores" in arrays:
        critical = arrays["next_gate_scores"] >= tau
    elif _critical_fits(h, cfg):
        critical = arrays["next_gate_critical"].astype(bool)
    else:  # check() refused every setting that reads them
        critical = np.zeros((n, layers, k), bool)
    dtype = np.int16 if shape.num_experts < 2**15 else np.int32
    seqs = len(arrays["prompt_len"])
    counts = arrays.get("prefill_counts", np.zeros((seqs, layers, shape.num_experts), np.int32))
    return Stream(
        key=stream_key(cfg),
        # An imported stream's record is where it came from; it has no batch (replay's
        # batch_rows is NaN).
        config={
            "stream_file": str(Path(path).resolve()),
            "stream_file_sha256": file_sha256(path),
            "source": h.meta.get("source", ""),
        },
        shape=shape,
        dims=dims,
        scores=h.meta.get("scores", {}),
        prompt_len=arrays["prompt_len"].astype(np.int32),
        prefill_counts=counts.astype(np.int32),
        decode_steps=arrays["decode_steps"].astype(np.int32),
        experts=arrays["experts"].astype(dtype),
        high=high,
        next_gate=arrays.get("next_gate", np.zeros((n, layers, 0)))[..., :NEXT_GATE_DEPTH].astype(
            dtype
        ),
        next_gate_critical=critical,
    )


def _check_arrays(a: dict, shape, path: str) -> None:
    """Every array of the trace has the shape and range the model's shape asks for."""
    layers, num, k = shape.num_moe_layers, shape.num_experts, shape.top_k
    seqs = len(a["prompt_len"])
    n = int(a["decode_steps"].sum()) if seqs else 0
    want = {
        "prompt_len": (seqs,),
        "decode_steps": (seqs,),
        "experts": (n, layers, k),
        "prefill_counts": (seqs, layers, num),
        "gate_scores": (n, layers, k),
        "high": (n, layers, k),
        "next_gate_scores": (n, layers, k),
        "next_gate_critical": (n, layers, k),
    }
    for name, shape in want.items():  # the required fields first
        if name in a and a[name].shape != shape:
            raise TraceError(
                f"{path}: {name} has shape {a[name].shape}; the model ({layers} MoE layers, "
                f"{num} experts, top-{k}) and {seqs} sequences of {n} decode steps need {shape}"
            )
    if "next_gate" in a and a["next_gate"].shape[:2] != (n, layers):
        raise TraceError(
            f"{path}: next_gate has shape {a['next_gate'].shape}; need ({n}, {layers}, depth)"
        )
    for name in ("prompt_len", "decode_steps", "prefill_counts"):
        if name in a and (a[name].dtype.kind not in "iu" or (a[name] < 0).any()):
            raise TraceError(f"{path}: {name} must hold integers >= 0")
    ex = a["experts"]
    if ex.dtype.kind not in "iu" or ((ex < 0) | (ex >= num)).any():
        raise TraceError(f"{path}: experts must be integers in [0, {num})")
    if (np.diff(np.sort(ex, axis=-1), axis=-1) == 0).any():
        raise TraceError(f"{path}: a token chose one expert twice in one layer (experts)")
    if "next_gate" in a:
        g = a["next_gate"]
        if g.dtype.kind not in "iu" or ((g < -1) | (g >= num)).any():
            raise TraceError(f"{path}: next_gate must be integers in [-1, {num})")
    for name in ("gate_scores", "next_gate_scores"):
        if name in a and not (np.isfinite(a[name]).all() and (a[name] >= 0).all()):
            raise TraceError(f"{path}: {name} must be finite and >= 0 (normalised gate weights)")


# --- writing -----------------------------------------------------------------------------------


def write(out: str | Path, arrays: dict, **meta) -> Path:
    """Write a trace: `arrays` by field name (every REQUIRED one, any OPTIONAL ones) and `meta`
    beside the format and version. Its fit to a model's shape is checked where it is imported."""
    missing = [name for name in REQUIRED if name not in arrays]
    unknown = sorted(set(arrays) - set(REQUIRED + OPTIONAL))
    if missing or unknown:
        raise TraceError(f"{out}: missing field(s) {missing}, unknown field(s) {unknown}")
    meta = {"format": FORMAT, "version": VERSION, **meta}
    out = Path(out)
    with open(out, "wb") as f:
        np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
    return out


def export(stream: Stream, out: str | Path, source: str = "") -> Path:
    """Write a recorded stream as a trace. Its high flags and next-gate critical flags are
    those of the policy that recorded it (meta high_policy): a recorded pass keeps no gate
    scores, so the trace replays DBSC at that precision and tau only."""
    policy = stream.config.get("policy", {})
    meta = {
        "model": stream.config.get("model", {}).get("name", ""),
        "shape": dataclasses.asdict(stream.shape),
        "source": source or f"slicemoe stream {stream.key}",
        "scores": stream.scores,
    }
    arrays = {
        "prompt_len": stream.prompt_len,
        "decode_steps": stream.decode_steps,
        "experts": stream.experts,
        "prefill_counts": stream.prefill_counts,
        "next_gate": stream.next_gate,
    }
    if policy:
        meta["high_policy"] = {"precision": policy["precision"], "tau": policy["tau"]}
        arrays.update(high=stream.high, next_gate_critical=stream.next_gate_critical)
    return write(out, arrays, **meta)


def _stream_of(source: str) -> Stream:
    """A requests.npz file, or the one an MLflow run (its id; MLFLOW_TRACKING_URI) keeps."""
    if Path(source).is_file():
        return Stream.load(source)
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        path = mlflow.artifacts.download_artifacts(
            run_id=source, artifact_path="requests.npz", dst_path=tmp
        )
        return Stream.load(path)


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slicemoe.traces", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write a recorded request stream as a trace")
    ex.add_argument("stream", help="a requests.npz file, or an MLflow run id that keeps one")
    ex.add_argument("out", help="the trace file to write (.npz)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stream = _stream_of(args.stream)
    path = export(stream, args.out, source=f"slicemoe stream {stream.key} from {args.stream}")
    steps, layers, k = stream.experts.shape
    print(f"{path}: {stream.num_sequences} sequences, {steps} decode steps of {layers} x top-{k}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
