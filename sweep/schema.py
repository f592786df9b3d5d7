"""The structured schema of the Hydra app: one `RunConfig` plus how and where to run it.

Registering the schema in the ConfigStore makes OmegaConf type-check every group file and every
command-line override against the `slicemoe.config` dataclasses, so `bits.low=abc` or a typo such
as `policy.tua=0.3` fails at composition time with the full key in the message.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

from slicemoe.config import RunConfig
from slicemoe.eval import shipped
from slicemoe.validate import INF, ConfigError, check_bounds
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
    # Replay every job whose requests cannot depend on the cache from one model pass per stream
    # key (slicemoe.replay); false runs every job with the model in the loop.
    replay: bool = True
    # Cache sizes of the miss-ratio curve logged for each recorded stream (miss_ratio_curve.csv
    # and .png of the run that recorded it): 1/N .. 100 % of the experts at 8 bits; 0 = none.
    miss_ratio_points: int = 50
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
        parent, _, name = key.rpartition(".")
        node = OmegaConf.structured(AppConfig)
        known = list(OmegaConf.select(node, parent).keys()) if parent else list(node.keys())
        near = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join((parent + '.' if parent else '') + n for n in near)}?"
        raise SweepError(
            f"{key}: no such config field.{hint if near else ''} Fields here: {', '.join(known)}"
        ) from None


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


def run_config(cfg: DictConfig) -> RunConfig:
    """The `RunConfig` part of a composed app config, resolved, as the dataclass (after checking
    that the config has no unknown keys and sane launch settings)."""
    check_keys(cfg)
    check_settings(cfg)
    resolved = {
        k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
        for k in RUN_FIELDS
    }
    run_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), resolved))
    if run_cfg.model.path is None and run_cfg.model.name != "tiny":
        # A null path means the shipped tiny checkpoint; for any other model that would quietly
        # run the wrong network.
        raise SweepError(
            f"model.path is not set for model={run_cfg.model.name}: pass "
            "model.path=/path/to/its/checkpoint (a local Hugging Face directory)"
        )
    return run_cfg
