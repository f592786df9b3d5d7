"""A job = one run's resolved config plus what the sweep derives from it (keys, params, name).

Jobs are built in the driver, validated all together before any work starts, and shipped to the
actors, so they hold plain data only.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from slicemoe.config import PACKED_ALIKE, RunConfig
from slicemoe.metrics import METRICS as RESULT_METRICS  # logged to MLflow under these names
from sweep.errors import SweepError

# Fields that say where or how a run executes, not what it computes: two configs that differ
# only here are the same run and share a run key.
VOLATILE = frozenset({"model.device", "model.backend", "trace_path"})
# Part of every key, so that a change in how keys are derived never matches older runs.
KEY_VERSION = "1"
RUNNER_API = ("validate", "load_key", "load", "run")
# Optional: a runner that also has these can serve many jobs from one recorded request stream.
REPLAY_API = ("replayable", "stream_key", "record", "replay")


@dataclass
class Job:
    index: int
    name: str  # the job's own overrides, e.g. "cache=frac_10 policy=dbsc"; "defaults" if none
    overrides: list[str]
    config: RunConfig
    key: str
    load_key: str
    params: dict[str, str] = field(default_factory=dict)
    config_yaml: str = ""
    # Jobs with one stream key share a model pass and are replayed from its request stream;
    # None: the model runs in the loop (cache-aware policies, sweep.replay=false).
    stream_key: str | None = None


@dataclass
class Outcome:
    status: str  # FINISHED | FAILED
    metrics: dict[str, float]
    run_id: str | None = None
    error: str | None = None
    # Set when the tracking store could not take the run: its RunRecord, for the spool
    # (sweep.sync), and the store's error.
    record: Any = None
    store_error: str | None = None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# Config fields added after KEY_VERSION 1, with the value a run had before the field existed:
# left out of the key at that value, so stored runs still resume. Written out, not read from
# the dataclasses: were a default to change later, runs at the new default must not take the
# keys of runs made at the old one.
ADDED = {
    "prefetch.name": "none",
    "prefetch.predictor": "none",
    "prefetch.top_m": 0,
    "prefetch.slices": "msb",
    "prefetch.insert": "mru",
    "cache.slru_protected": 0.8,
    "cache.s3fifo_small": 0.1,
    "cache.lrfu_lambda": 0.01,
    "cache.lecar_learning_rate": 0.45,
    "stream_file": None,
    "policy.drop_below": 0.1,
}
# Config fields renamed after KEY_VERSION 1: the old name, and the old value of each new value
# the old field had: a run keys as it did under the old name, so stored runs still resume.
RENAMED = {"policy.on_miss": ("policy.lsb_miss", {"fetch": "fetch", "skip_lsb": "skip"})}


def run_key(cfg: RunConfig) -> str:
    """Hash of the resolved run config minus VOLATILE fields; stable across processes."""
    flat = {}
    for k, v in flatten(asdict(cfg)).items():
        if k in VOLATILE or (k in ADDED and v == ADDED[k]):
            continue
        if k in RENAMED and v in RENAMED[k][1]:
            k, v = RENAMED[k][0], RENAMED[k][1][v]
        flat[k] = v
    blob = KEY_VERSION + json.dumps(flat, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def units_of(jobs: list[Job], pack_rows: int | None = 0) -> list[list[Job]]:
    """Jobs with one stream key form one unit (one model pass); every other job is a unit of its
    own. With `pack_rows`, units whose passes may share one (slicemoe.run.record_packed: same
    model, bits, task, seed and batch) are joined, their jobs one stream key after another,
    while their problems together stay within that many rows (see `pack_rows`)."""
    groups: dict[str, list[Job]] = {}
    units: list[list[Job]] = []
    for job in jobs:
        if job.stream_key is None:
            units.append([job])
        elif job.stream_key in groups:
            groups[job.stream_key].append(job)
        else:
            groups[job.stream_key] = [job]
            units.append(groups[job.stream_key])
    if pack_rows == 0:
        return units
    packed: list[list[Job]] = []
    open_units: dict[str, tuple[list[Job], int]] = {}  # pack key -> (unit, configs in it)
    for unit in units:
        c = unit[0].config
        rows = c.batch_size if pack_rows is None else pack_rows
        per_config = c.eval.limit
        fits = isinstance(rows, int) and per_config and 2 * per_config <= rows
        if unit[0].stream_key is None or c.stream_file is not None or not fits:
            packed.append(unit)
            continue
        key = json.dumps([asdict(c)[name] for name in PACKED_ALIKE], sort_keys=True)
        joined, n = open_units.get(key, (None, 0))
        if joined is not None and (n + 1) * per_config <= rows:
            joined.extend(unit)
            open_units[key] = (joined, n + 1)
        else:
            packed.append(unit)
            open_units[key] = (unit, 1)
    return packed


def load_runner(name: str) -> ModuleType:
    try:
        module = importlib.import_module(name)
    except ImportError as err:
        raise SweepError(f"sweep.runner={name}: cannot import it ({err})") from None
    missing = [fn for fn in RUNNER_API if not callable(getattr(module, fn, None))]
    if missing:
        raise SweepError(f"sweep.runner={name}: the module lacks {', '.join(missing)}")
    return module


# Overrides that say how or where to run, not what: left out of run names.
SETTINGS = ("hydra.", "ray.", "mlflow.", "sweep.")


def is_setting(override: str) -> bool:
    return override.lstrip("+~").startswith(SETTINGS)


def job_name(overrides: Sequence[str]) -> str:
    return " ".join(o for o in overrides if not is_setting(o)) or "defaults"


def make_job(index: int, cfg: DictConfig, overrides: Sequence[str], runner: ModuleType) -> Job:
    """Resolve, validate and key one job; a semantic error raises SweepError naming the field."""
    from sweep import schema  # the model registries: the driver's, not an actor's

    name = job_name(overrides)
    run_cfg = schema.run_config(cfg)
    try:
        runner.validate(run_cfg)
    except ValueError as err:
        field_name = getattr(err, "field", None)
        message = str(err)
        if field_name and field_name not in message:
            message = f"{field_name}: {message}"
        raise SweepError(f"Invalid config for run [{name}]:\n  {message}") from None
    params = {k: "null" if v is None else str(v) for k, v in flatten(asdict(run_cfg)).items()}
    replays = cfg.sweep.replay and all(callable(getattr(runner, f, None)) for f in REPLAY_API)
    return Job(
        index=index,
        name=name,
        overrides=list(overrides),
        config=run_cfg,
        key=run_key(run_cfg),
        load_key=str(runner.load_key(run_cfg)),
        params=params,
        config_yaml=OmegaConf.to_yaml(OmegaConf.structured(run_cfg)),
        stream_key=runner.stream_key(run_cfg) if replays and runner.replayable(run_cfg) else None,
    )


def objective_of(cfg: DictConfig) -> list[str] | None:
    names = list(cfg.sweep.objective or [])
    unknown = [n for n in names if n not in RESULT_METRICS]
    if unknown:
        raise SweepError(
            f"sweep.objective: unknown metric(s) {', '.join(unknown)}; choose from "
            + ", ".join(RESULT_METRICS)
        )
    return names or None


def return_value(metrics: dict[str, float], objective: Sequence[str] | None) -> Any:
    """What the sweeper gets back: the metrics dict, or the objective metric(s) as floats."""
    if not objective:
        return dict(metrics)
    values = [float(metrics[name]) for name in objective]
    return values[0] if len(values) == 1 else values
