"""The structured schema of the Hydra app: one `RunConfig` plus how and where to run it.

Registering the schema in the ConfigStore makes OmegaConf type-check every group file and every
command-line override against the `slicemoe.config` dataclasses, so `bits.low=abc` fails at
composition time with the full key in the message. A misspelt key (`policy.tua=0.3`) is refused
before that, naming the nearest field (check_key, from sweep.app.check_command_line).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import ChoiceSweep, Override
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, InterpolationResolutionError, ValidationError

from slicemoe.config import RunConfig
from slicemoe.eval import shipped
from slicemoe.ranges import INF, ConfigError, check_bounds
from sweep.errors import SweepError


@dataclass
class RayConf:
    # None: attach to $RAY_ADDRESS when set (as inside `ray job submit`), else start a private
    # local instance. "auto" or "host:port" attach to a running cluster.
    address: Optional[str] = None
    # None: as many actors as the cluster's CPUs/GPUs allow, capped by the number of runs.
    num_actors: Optional[int] = None
    num_cpus_per_actor: float = 1.0
    # None: one whole GPU per actor when the cluster has GPUs, else CPU only.
    num_gpus_per_actor: Optional[float] = None
    # Loaded models an actor keeps; each one is a full copy of the quantized weights.
    models_per_actor: int = 1
    # How often a run is re-dispatched after the actor executing it died.
    max_actor_failures: int = 2
    # Where a model pass's replays run: true, as one-CPU Ray tasks, so the actor goes on to the
    # next pass; false, in the actor that recorded it. None: tasks when actors hold GPUs (the
    # GPU is the scarce part), else in the actor (its CPU is as good, and warm).
    replay_tasks: Optional[bool] = None
    # Object store of a private local instance (Ray's minimum is 75); runs exchange small dicts.
    object_store_mb: int = 128
    # Passed to ray.init; on a cluster without the code installed, e.g. {"working_dir": "."}.
    runtime_env: dict[str, Any] = field(default_factory=dict)


@dataclass
class MlflowConf:
    # A relative sqlite path is taken from the driver's working directory and made absolute, so
    # actors log to the same file.
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = "slicemoe"
    # None: MLflow's default for the tracking store, fixed when the experiment is created.
    artifact_location: Optional[str] = None
    # Results the store could not take (server down, database locked or full) wait here, in the
    # driver's working directory unless absolute, until they are pushed (sweep.sync).
    spool: str = "mlflow-spool"
    # At the end of a sweep with spooled results: how long to keep trying the store before
    # exiting non-zero with the list of spooled runs.
    outage_wait_s: float = 120.0


@dataclass
class SweepConf:
    # Skip runs whose run key already has a FINISHED run in the experiment.
    resume: bool = True
    # Parent-run name and sweep identity; None derives both from the command-line overrides.
    name: Optional[str] = None
    # Metric name(s) returned to the sweeper instead of the metrics dict (Optuna needs floats).
    objective: Optional[list[str]] = None
    # Replay every job from one model pass per stream key (slicemoe.replay; a job whose requests
    # depend on the cache shares its pass with its hardware variants only); false runs every job
    # with the model in the loop.
    replay: bool = True
    # Set each replayed run beside Belady's oracle (slicemoe.optimality: one more replay of the
    # run, and one of Belady per stream and cache size, in the reference cache: slow at a real
    # model's size).
    optimality: bool = True
    # Cache sizes of the miss-ratio curve logged for each recorded stream (miss_ratio_curve.csv
    # and .png of the run that recorded it): 1/N .. 100 % of the experts at 8 bits; 0 = none.
    miss_ratio_points: int = 50
    # Model passes that may share one (same model, bits, task, seed and batch_size; each config
    # its own rows of every batch, slicemoe.run.record_packed) are packed while their problems
    # (eval.limit each) together stay within this many rows, so that configs which alone would
    # not fill a batch share it. None: the configs' batch_size where it is a number (`auto` is
    # known only once the model is loaded: set this, e.g. to the batch a GPU took); 0: never.
    pack_rows: Optional[int] = None
    # Module providing validate / load_key / load / run with the signatures of slicemoe.run
    # (and, for replay, replayable / stream_key / record / replay).
    runner: str = "slicemoe.run"


@dataclass
class AppConfig(RunConfig):
    ray: RayConf = field(default_factory=RayConf)
    mlflow: MlflowConf = field(default_factory=MlflowConf)
    sweep: SweepConf = field(default_factory=SweepConf)


RUN_FIELDS = tuple(f.name for f in fields(RunConfig))
# The launch settings with a range, as slicemoe.validate.BOUNDS.
SETTING_BOUNDS = (
    ("ray.num_actors", 1, INF, False),
    ("ray.num_cpus_per_actor", 0, INF, False),
    ("ray.num_gpus_per_actor", 0, INF, False),
    ("ray.models_per_actor", 1, INF, False),
    ("ray.max_actor_failures", 0, INF, False),
    ("ray.object_store_mb", 75, INF, False),
    ("mlflow.outage_wait_s", 0, INF, False),
    ("sweep.miss_ratio_points", 0, 10_000, False),
    ("sweep.pack_rows", 0, INF, False),
)
PREAMBLE = re.compile(
    r"^(While dereferencing interpolation '.*?': |\w+ raised while resolving interpolation: )"
)
ADDRESS = re.compile(r"auto|local|[a-z]+://\S+|[\w.\-\[\]:]+:\d+")


def register() -> None:
    ConfigStore.instance().store(name="slicemoe_app", node=AppConfig)
    # `${slicemoe.data:NAME}`: a text shipped with the package, e.g. the paper_table1 preset's.
    OmegaConf.register_new_resolver("slicemoe.data", shipped, replace=True)


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not have. Hydra lets `+key=value` add any key, so without
    this a typo such as `+polcy.tau=0.3` would be accepted and silently ignored."""
    data = OmegaConf.to_container(cfg, resolve=False)
    data.pop("hydra", None)
    try:
        OmegaConf.merge(OmegaConf.structured(AppConfig), data)
    except ConfigKeyError as err:
        key = err.full_key or str(err.key)
        parent = key.rpartition(".")[0]
        node = OmegaConf.structured(AppConfig)
        known = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
        raise no_such_field(key, known) from None


def check_key(key: str, groups: Iterable[str] = ()) -> None:
    """One dotted key of a command-line override, before Hydra composes: Hydra would answer a
    typo with advice to add it (`+key`), which check_keys then refuses. A key under a free-form
    dict (ray.runtime_env) is anything. `groups`: config groups, known names at the top."""
    node = OmegaConf.structured(AppConfig)
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not (OmegaConf.is_dict(node) and is_dataclass(OmegaConf.get_type(node))):
            return
        known = list(node.keys()) + (sorted(set(groups) - set(node.keys())) if depth == 0 else [])
        if part not in known:
            raise no_such_field(".".join(parts[: depth + 1]), known)
        if part not in node:  # a group name used as a key
            return
        node = node[part]


def check_values(overrides: Iterable[Override]) -> None:
    """Command-line overrides of existing keys against their fields' types, as Hydra will merge
    them (OmegaConf.update), before it composes: Hydra answers `bits.low=abc` or `~policy.tau`
    with a block of its own and a line about HYDRA_FULL_ERROR."""
    node = OmegaConf.structured(AppConfig)
    for override in overrides:
        key = override.key_or_group
        parent, _, name = key.rpartition(".")
        owner = OmegaConf.select(node, parent) if parent else node
        if not (OmegaConf.is_dict(owner) and is_dataclass(OmegaConf.get_type(owner))):
            continue  # a key under a free-form dict (ray.runtime_env)
        if override.is_delete():
            raise SweepError(
                f"{override.input_line}: {key} is a config field and cannot be deleted; set it "
                "to a value instead"
            )
        if isinstance(override.value(), ChoiceSweep):
            values = list(override.sweep_iterator())
        elif override.is_sweep_override():
            continue  # a range or interval: numbers, checked as Hydra composes each job
        else:
            values = [override.value()]
        for value in values:
            if isinstance(value, str) and "${" in value:
                continue  # an interpolation: resolved once composed (check_interpolations)
            try:
                OmegaConf.update(owner, name, value, merge=True)
            except ValidationError as err:
                raise SweepError(f"{override.input_line}: {err.msg.splitlines()[0]}") from None


def no_such_field(key: str, known: list[str]) -> SweepError:
    parent, _, name = key.rpartition(".")
    near = nearest(name, known, parent + "." if parent else "")
    return SweepError(f"{key}: no such config field.{near} Fields here: {', '.join(known)}")


def nearest(name: str, known: Iterable[str], prefix: str = "") -> str:
    """The hint naming the entries of `known` closest to a misspelt `name` (prefixed), or ""."""
    near = difflib.get_close_matches(name, list(known), n=3)
    return f" Did you mean {', '.join(prefix + n for n in near)}?" if near else ""


def check_settings(cfg: DictConfig) -> None:
    """The ray/mlflow/sweep settings of a launch, before anything starts."""
    try:
        check_bounds(cfg, SETTING_BOUNDS)
        for name in ("mlflow.tracking_uri", "mlflow.experiment", "mlflow.spool"):
            if not str(OmegaConf.select(cfg, name) or "").strip():
                raise ConfigError(name, "must not be empty")
        address = cfg.ray.address
        if address is not None and not ADDRESS.fullmatch(address):
            raise ConfigError(
                "ray.address", f"{address!r}: use auto, local, HOST:PORT or ray://HOST:PORT"
            )
        if cfg.sweep.name is not None and not cfg.sweep.name.strip():
            raise ConfigError(
                "sweep.name", "must not be empty; drop it to name the sweep by its overrides"
            )
    except ConfigError as err:
        raise SweepError(f"Invalid setting {err}") from None


def check_interpolations(cfg: DictConfig) -> None:
    """Resolve every `${...}` of the config (Hydra's own section aside) before any work: one that
    cannot be resolved is refused naming its override, not with a traceback from wherever the
    value is first read."""
    try:
        for key in cfg:
            if key != "hydra" and OmegaConf.is_config(cfg[key]):
                OmegaConf.to_container(cfg[key], resolve=True)
    except InterpolationResolutionError as err:
        # OmegaConf's first line, less its preamble: what failed (oc.env's "Environment
        # variable 'X' not found", a key not found, a value of the wrong type).
        why = PREAMBLE.sub("", err.msg.splitlines()[0]).strip('"')
        # Read unresolved: Hydra keeps the override strings, ${...} and all, as config values
        # (a swept value with its braces escaped).
        overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None)
        given = [
            o.replace("\\{", "{").replace("\\}", "}")
            for o in (OmegaConf.to_container(overrides, resolve=False) if overrides else [])
            if o.split("=", 1)[0].lstrip("+~") == err.full_key
        ]
        what = f"override {given[-1]}" if given else f"value of {err.full_key}"
        raise SweepError(
            f"Invalid {what}: its interpolation cannot be resolved ({why}); fix it or give a "
            "plain value"
        ) from None


def run_config(cfg: DictConfig) -> RunConfig:
    """The `RunConfig` part of a composed app config, resolved, as the dataclass (after checking
    that the config has no unknown keys, no interpolation that fails and sane launch
    settings)."""
    check_interpolations(cfg)
    check_keys(cfg)
    check_settings(cfg)
    resolved = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in RUN_FIELDS
    }
    run_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), resolved))
    if run_cfg.model.path is None and run_cfg.model.name != "tiny" and not run_cfg.stream_file:
        # A null path means the shipped tiny checkpoint; for any other model that would quietly
        # run the wrong network. A trace (stream_file) needs the shipped config.json only.
        raise SweepError(
            f"model.path is not set for model={run_cfg.model.name}: pass "
            "model.path=/path/to/its/checkpoint (a local Hugging Face directory)"
        )
    return run_cfg
