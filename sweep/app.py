"""The Hydra app: `python -m sweep [overrides]` runs one run in this process.

With `-m` Hydra hands the jobs to the launcher (`hydra/launcher=slicemoe_ray`, sweep.launcher),
which never calls `task`; `task` serves single runs (and other launchers, should one be chosen).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import hydra
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.errors import OverrideParseException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sweep import schema
from sweep.errors import SweepError, stops
from sweep.jobs import Outcome, load_runner, make_job, objective_of, return_value

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# A launch needs little room (the tracking database grows by kilobytes a run), but a disk this
# full would fail it half-way.
MIN_FREE_MB = 50

schema.register()


def task(cfg: DictConfig) -> Any:
    runner = load_runner(cfg.sweep.runner)
    objective = objective_of(cfg)
    job = make_job(0, cfg, list(HydraConfig.get().overrides.task), runner)

    # Imported once the config is known to be valid: config errors show without waiting for
    # MLflow to import.
    from sweep import worker
    from sweep.ledger import Ledger
    from sweep.progress import RunBar, result_table

    ledger = Ledger(cfg)
    # A finished run in the store is found by the claim; one in the spool is not.
    done = ledger.spooled_done.get(job.key) if cfg.sweep.resume else None
    record = ledger.claim_or_wait(job) if done is None else done
    if isinstance(record, Outcome):
        print(result_table([(job.name, "FINISHED", record.metrics)]))
        log.info(
            f"finished already as MLflow run {record.run_id} (run key {job.key}); "
            "sweep.resume=false computes it again"
        )
        return return_value(record.metrics, objective)
    _threads_like_an_actor(cfg.ray.num_cpus_per_actor)
    bar = RunBar("[run]")
    try:
        outcome = worker.execute(runner, worker.ModelCache(1), job, record, ledger.tracker, bar)
    except BaseException:  # Ctrl-C: rerunning the command redoes it
        ledger.kill_in_flight([record.run_id])
        raise
    finally:
        bar.close()
    ledger.received(outcome)
    print(result_table([(job.name, outcome.status, outcome.metrics)]))
    ledger.drain()
    if outcome.status != "FINISHED":
        raise SweepError(
            f"run [{job.name}] failed: {outcome.error} (MLflow run {outcome.run_id}; its "
            "error.txt holds the traceback)"
        )
    log.info(f"MLflow run {outcome.run_id} in {ledger.tracker.uri}")
    return return_value(outcome.metrics, objective)


def _threads_like_an_actor(num_cpus: float) -> None:
    """torch's default of a thread per core is slow on a small, busy box; a Ray actor gets
    `ray.num_cpus_per_actor` threads, and so does a run in this process."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


class Preflight(Callback):
    """Before Hydra makes its output folder: every folder the launch writes to must be writable
    and have room, so that a read-only or full disk stops it in one line naming the path."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, str(config.hydra.run.dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, str(config.hydra.sweep.dir))

    @staticmethod
    def _check(config: DictConfig, output_dir: str) -> None:
        # Hydra turns a callback's exception into a warning and goes on; this must stop.
        with stops():
            schema.check_interpolations(config)
            check_folders(config, output_dir)


def check_folders(cfg: DictConfig, output_dir: str) -> None:
    folders = {"the output folder": output_dir, "mlflow.spool": cfg.mlflow.spool}
    uri = urlparse(str(cfg.mlflow.tracking_uri))
    if uri.scheme == "sqlite":
        folders["mlflow.tracking_uri"] = str(Path(uri.path.removeprefix("/")).parent)
    for what, folder in folders.items():
        path = Path(folder).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            raise SweepError(
                f"{what} {path} cannot be written: {existing} is read-only or not a folder; run "
                "from a writable folder or point that setting elsewhere"
            )
        free = shutil.disk_usage(existing).free
        if free < MIN_FREE_MB * 2**20:
            raise SweepError(
                f"{what} {path}: only {free / 2**20:.1f} MB free on {existing}; free some space "
                "or point that setting elsewhere"
            )


def check_command_line(argv: list[str]) -> None:
    """Every override's key and value against the schema and every group option against conf/,
    before Hydra composes: Hydra answers `policy.tua=0.3` with advice to append it and
    `policy=dbcs` with a list of every option, neither naming the nearest valid one, and
    `bits.low=abc` with a block of its own. Overrides that do not parse are left to Hydra."""
    args = get_args_parser().parse_known_args(argv)[0]
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException:
        return
    root = Path(args.config_dir or CONF_DIR)
    groups = {
        d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in root.iterdir() if d.is_dir()
    }
    values = []
    for override in overrides:
        key = override.key_or_group
        if override.package is not None or key.startswith("hydra"):
            continue
        if key not in groups:
            schema.check_key(key, groups)
            values.append(override)
            continue
        if override.is_delete():
            continue
        value = override.value()
        if isinstance(value, ChoiceSweep):
            names = list(override.sweep_string_iterator())
        else:
            names = [value] if isinstance(value, str) else []
        for name in names:
            if name not in groups[key]:
                raise SweepError(
                    f"{key}={name}: no such option of {key}.{schema.nearest(name, groups[key], key + '=')} "
                    f"Options: {', '.join(groups[key])}"
                )
    schema.check_values(values)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Any:
    with stops():
        return task(cfg)
