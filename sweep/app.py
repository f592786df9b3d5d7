"""The Hydra app: `python -m sweep [overrides]` runs one run in this process.

With `-m` Hydra hands the jobs to the launcher (`hydra/launcher=slicemoe_ray`, sweep.launcher),
which never calls `task`; `task` serves single runs (and other launchers, should one be chosen).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from sweep import schema
from sweep.errors import SweepError
from sweep.jobs import load_runner, make_job, objective_of, return_value

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

schema.register()


def task(cfg: DictConfig) -> Any:
    runner = load_runner(cfg.sweep.runner)
    objective = objective_of(cfg)
    job = make_job(0, cfg, list(HydraConfig.get().overrides.task), runner)

    # Imported once the config is known to be valid: config errors show without waiting for
    # MLflow to import.
    from sweep import worker
    from sweep.progress import result_table
    from sweep.tracking import Tracker, git_commit, stored_metrics

    tracker = Tracker.open(
        cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.artifact_location
    )
    done = tracker.finished().get(job.key) if cfg.sweep.resume else None
    if done is not None:
        metrics = stored_metrics(done)
        print(result_table([(job.name, "FINISHED", metrics)]))
        log.info(
            f"finished already as MLflow run {done.info.run_id} (run key {job.key}); "
            "sweep.resume=false computes it again"
        )
        return return_value(metrics, objective)
    tracker.kill_stale({job.key})
    run_id = tracker.create_run(job, None, "", git_commit())
    _threads_like_an_actor(cfg.ray.num_cpus_per_actor)
    try:
        outcome = worker.execute(runner, worker.ModelCache(1), job, run_id, tracker)
    except BaseException:
        tracker.client.set_terminated(run_id, "KILLED")  # Ctrl-C: rerunning the command redoes it
        raise
    print(result_table([(job.name, outcome.status, outcome.metrics)]))
    if outcome.status != "FINISHED":
        raise SweepError(
            f"run [{job.name}] failed: {outcome.error} (MLflow run {run_id}; its error.txt holds "
            "the traceback)"
        )
    log.info(f"MLflow run {run_id} in {tracker.uri}")
    return return_value(outcome.metrics, objective)


def _threads_like_an_actor(num_cpus: float) -> None:
    """torch's default of a thread per core is slow on a small, busy box; a Ray actor gets
    `ray.num_cpus_per_actor` threads, and so does a run in this process."""
    import torch

    torch.set_num_threads(max(1, int(num_cpus)))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Any:
    return task(cfg)
