"""A multirun on Ray actors, tracked in MLflow: what the `slicemoe_ray` Hydra launcher does.

One `launch` call (a batch from the sweeper; Optuna sends many) goes:
1. compose every job's config, validate all of them (nothing starts if one is wrong);
2. open the tracking store (pushing what an earlier launch spooled) and the sweep's parent run
   (reopened when the sweep is relaunched);
3. skip jobs whose run key already has a FINISHED run, in the store or in the spool;
4. run the rest on the actor pool (started on the first batch, kept for later ones), each claimed
   right before dispatch (sweep.ledger), so concurrent drivers share the work;
5. close the parent, print a result table, push what waits in the spool, hand Hydra one JobReturn
   per job.
The task function is never called in the driver: the actors run `sweep.worker.execute`.

Hydra imports this module (through hydra_plugins) whenever any Hydra app starts, so MLflow and
Ray are imported inside the methods that need them, not at the top.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from hydra.types import HydraContext
from omegaconf import DictConfig, OmegaConf, open_dict

from sweep.errors import SweepError
from sweep.jobs import (
    Job,
    Outcome,
    is_setting,
    load_runner,
    make_job,
    objective_of,
    return_value,
    units_of,
)
from sweep.progress import Progress, result_table, short_names

log = logging.getLogger(__name__)

# Overrides that do not change what a sweep computes, so relaunching with a different value
# (e.g. on a cluster instead of locally) continues the same sweep.
NOT_IDENTITY = ("hydra.", "ray.", "sweep.resume", "sweep.objective", "mlflow.tracking_uri")
# Sweepers that enumerate their jobs up front and need no number back (all others optimise).
GRID_SWEEPERS = (
    "hydra._internal.core_plugins.basic_sweeper.BasicSweeper",
    "hydra_plugins.slicemoe_sweeper.slicemoe_sweeper.GridsSweeper",
)


class Multirun:
    """State kept across the batches of one multirun: tracking, parent run, actor pool."""

    def __init__(self, config: DictConfig, hydra_context: HydraContext) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.ledger: Any = None
        self.pool: Any = None
        self.rows: list[tuple[Job, Outcome]] = []
        self.done: dict[str, Outcome] = {}  # run key -> its finished run
        self.sweep_dir = Path(".")
        self.counts = {"total": 0, "finished": 0, "failed": 0, "skipped": 0}

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        cfg = self.config
        # Hydra's sweepers write their own summaries there (e.g. optimization_results.yaml).
        self.sweep_dir = Path(str(cfg.hydra.sweep.dir))
        try:
            self.sweep_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SweepError(f"cannot create {self.sweep_dir}: {err.strerror}") from None
        runner = load_runner(cfg.sweep.runner)
        objective = self._objective(cfg)
        composed = [
            self._compose(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)
        ]
        _check_settings_fixed(composed)
        jobs = [
            make_job(initial_job_idx + i, c, o, runner)
            for i, (c, o) in enumerate(zip(composed, job_overrides))
        ]
        self._open_tracking(cfg)
        done = self.done if cfg.sweep.resume else {}
        todo: dict[str, Job] = {}
        for job in jobs:
            if job.key not in done:
                todo.setdefault(job.key, job)  # identical configs in one batch run once
        skipped = len(jobs) - len(todo)
        log.info(
            f"{len(jobs)} runs: {len(todo)} to run, {skipped} finished already or duplicated "
            f"(experiment {cfg.mlflow.experiment!r}, parent run {self.ledger.parent_id})"
        )
        # Passes share a pass (packed) only through a runner that can record them so.
        pack_rows = cfg.sweep.pack_rows if callable(getattr(runner, "record_packed", None)) else 0
        outcomes = self._execute(cfg, list(todo.values()), len(jobs), skipped, pack_rows)
        by_key = {j.key: outcomes[j.index] for j in todo.values() if j.index in outcomes}
        self.done.update({k: o for k, o in by_key.items() if o.status == "FINISHED"})
        results = [(job, by_key.get(job.key) or done[job.key]) for job in jobs]
        self._close_batch(results, skipped)
        print(result_table([(j.name, o.status, o.metrics) for j, o in results]), flush=True)
        self.ledger.drain()
        uri, parent_id = self.ledger.tracker.uri, self.ledger.parent_id
        print(where_results_are(uri, parent_id, self.sweep_dir), flush=True)
        return [_job_return(c, job, out, objective) for c, (job, out) in zip(composed, results)]

    def _compose(self, overrides: list[str], index: int) -> DictConfig:
        composed = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(composed):
            composed.hydra.job.id = index
            composed.hydra.job.num = index
        return composed

    def _objective(self, cfg: DictConfig) -> list[str] | None:
        objective = objective_of(cfg)
        sweeper = str(cfg.hydra.sweeper.get("_target_", GRID_SWEEPERS[0]))
        if objective is None and sweeper not in GRID_SWEEPERS:
            raise SweepError(
                f"hydra/sweeper {sweeper.rsplit('.', 1)[-1]} needs a number per run: set "
                "sweep.objective=[METRIC] (one metric per optimisation direction), e.g. "
                "sweep.objective=[accuracy]"
            )
        return objective

    def _open_tracking(self, cfg: DictConfig) -> None:
        from sweep.ledger import Ledger

        if self.ledger is None:
            self.ledger = Ledger(cfg)
            # Read once: later batches (Optuna sends many) add their own finished runs.
            self.done = self.ledger.done() if cfg.sweep.resume else {}
            self.ledger.open_parent(*sweep_identity(cfg))
        else:
            self.ledger.reopen_parent()

    def _execute(
        self, cfg: DictConfig, jobs: list[Job], total: int, skipped: int, pack_rows: int | None
    ) -> dict[int, Outcome]:
        names = dict(zip((j.index for j in jobs), short_names([j.name for j in jobs])))
        progress = Progress(total=total, skipped=skipped, names=names)
        if not jobs:
            progress.close()
            return {}
        pool = None
        try:
            # Jobs sharing a model pass run on one actor: size the pool by units.
            units = units_of(jobs, pack_rows)
            pool, plan = self._pool(cfg, len(units))
            if not self.rows:  # the first batch: an optimising sweeper sends many
                print(plan_text(units, plan, self.ledger.tracker.timings()), flush=True)
            return pool.run(units, self.ledger, lambda *n: progress.update(*n, pool.passes()))
        except BaseException:
            # Ctrl-C or a driver error: leave no run RUNNING; the relaunch reruns these. Runs an
            # actor finished (replayed members of a unit) stay FINISHED.
            slots = pool.inflight.values() if pool is not None else []
            self.ledger.kill_in_flight([r.run_id for s in slots for r in s.records])
            raise  # sweep.__main__ says it in one line
        finally:
            progress.close()

    def _pool(self, cfg: DictConfig, n_jobs: int) -> tuple[Any, Any]:
        from sweep import cluster

        ray_conf = OmegaConf.to_object(cfg.ray)
        address = cluster.connect(ray_conf)
        import ray  # after connect: it decides how the local instance binds

        plan = cluster.plan(ray_conf, n_jobs, ray.cluster_resources())
        if self.pool is None:
            from sweep.actors import ActorPool

            log.info(
                f"Ray {address}: {plan.actors} actors x ({plan.num_cpus:g} CPU, "
                f"{plan.num_gpus:g} GPU); replays "
                + ("as one-CPU tasks" if plan.replay_tasks else "in the actors")
            )
            args = (
                cfg.sweep.runner,
                ray_conf.models_per_actor,
                self.ledger.tracker.uri,
                self.ledger.tracker.experiment_id,
                # sweep.resume=false computes everything again, request streams included.
                bool(cfg.sweep.resume),
                int(cfg.sweep.miss_ratio_points),
                bool(cfg.sweep.optimality),
            )
            if ray_conf.replay_tasks and not plan.replay_tasks:
                log.warning("ray.replay_tasks: no CPU is left beside the actors; they replay")
            self.pool = ActorPool(
                plan, args, ray_conf.models_per_actor, ray_conf.max_actor_failures
            )
        else:
            self.pool.grow(plan.actors)
        return self.pool, plan

    def _close_batch(self, results: list[tuple[Job, Outcome]], skipped: int) -> None:
        from sweep.tracking import results_csv

        failed = [(j, o) for j, o in results if o.status != "FINISHED"]
        self.rows += results
        self.counts["total"] += len(results)
        self.counts["skipped"] += skipped
        self.counts["failed"] += len(failed)
        self.counts["finished"] += len(results) - len(failed)
        status = "FAILED" if failed else "FINISHED"
        table = results_csv(self.rows)
        path = self.sweep_dir / "results.csv"
        try:
            path.write_text(table)
        except OSError as err:
            raise SweepError(f"cannot write {path}: {err.strerror}") from None
        self.ledger.close_parent(status, self.counts, table)
        for job, out in failed:
            log.error(f"run [{job.name}] failed: {out.error} (MLflow run {out.run_id})")


def plan_text(units: list[list[Job]], plan: Any, timings: dict) -> str:
    """What the launch will do: model passes (each with the replays it feeds; a packed pass
    records several streams), runs with the model in the loop, and a time estimated from
    earlier runs of the same model, task and size in the experiment (`timings`,
    sweep.tracking.Tracker.timings; a packed pass is counted as one pass)."""
    fed = [u for u in units if u[0].stream_key is not None]
    traces = [u for u in fed if u[0].config.stream_file is not None]
    passes = [u for u in fed if u[0].config.stream_file is None]
    streams = [len({j.stream_key for j in u}) for u in passes]
    packed = [n for n in streams if n > 1]
    where = "as CPU tasks beside the actors" if plan.replay_tasks else "in the actors"
    lines = [
        f"plan: {len(passes)} model passes recording {sum(streams)} streams"
        + (f" ({len(packed)} passes packed with {sum(packed)} streams)" if packed else "")
        + (f" and {len(traces)} traces imported" if traces else "")
        + f" feeding {sum(map(len, fed))} replays ({where}; a stream stored already is not "
        f"recorded), {len(units) - len(fed)} runs with the model in the loop; "
        f"{plan.actors} actors"
    ]
    pass_s = replay_s = 0.0
    unknown = 0
    for unit in units:
        c = unit[0].config
        known = timings.get(timing_key(c.model.name, c.eval.task, c.eval.limit))
        if known is None:
            unknown += 1
            continue
        pass_s += known[0]
        replay_s += known[1] * len(unit) if unit[0].stream_key else 0.0
    if unknown < len(units):
        # Passes spread over the actors; replays over the CPUs left to them, or after each pass.
        if plan.replay_tasks:  # the replays overlap the passes
            wall = max(pass_s / plan.actors, replay_s / max(1, int(plan.free_cpus)))
        else:
            wall = (pass_s + replay_s) / plan.actors
        lines.append(
            f"estimate: {_duration(wall)} for the {len(units) - unknown} units of a model, task "
            f"and size run before in this experiment"
            + (f"; {unknown} units have no earlier timing" if unknown else "")
        )
    else:
        lines.append("estimate: none yet (no earlier run of this model, task and size here)")
    return "\n".join(lines)


def timing_key(model: str, task: str, limit: object) -> tuple[str, str, str]:
    """What a pass's time depends on most, as the run's MLflow params spell it."""
    return model, task, "null" if limit is None else str(limit)


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


def sweep_identity(cfg: DictConfig) -> tuple[str, str]:
    """A stable id for "this sweep" (same command line, same sweeper) and a display name."""
    overrides = sorted(
        o for o in cfg.hydra.overrides.task if not o.lstrip("+~").startswith(NOT_IDENTITY)
    )
    blob = json.dumps(
        {
            "experiment": cfg.mlflow.experiment,
            "name": cfg.sweep.name,
            "overrides": overrides,
            "sweeper": OmegaConf.to_container(cfg.hydra.sweeper, resolve=False),
        },
        sort_keys=True,
        default=str,
    )
    name = cfg.sweep.name or " ".join(o for o in overrides if not is_setting(o)) or "defaults"
    return hashlib.sha256(blob.encode()).hexdigest()[:16], name


def _check_settings_fixed(composed: list[DictConfig]) -> None:
    """ray/mlflow/sweep settings belong to the whole multirun, not to single jobs."""
    first = composed[0]
    for section in ("ray", "mlflow", "sweep"):
        if any(c[section] != first[section] for c in composed[1:]):
            raise SweepError(
                f"{section}.* differs between the jobs of this multirun; set {section}.* "
                "once per launch (sweep other keys)"
            )


def where_results_are(uri: str, parent_id: str, sweep_dir: Path) -> str:
    browse = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite:") else uri
    return (
        f"results: MLflow parent run {parent_id} ({uri}), {sweep_dir / 'results.csv'}\n"
        f"browse: {browse}  |  figures: python -m sweep.report"
    )


def _job_return(
    composed: DictConfig, job: Job, outcome: Outcome, objective: list[str] | None
) -> JobReturn:
    task_cfg = copy.copy(composed)
    with open_dict(task_cfg):
        del task_cfg["hydra"]
    ret = JobReturn(
        overrides=job.overrides,
        cfg=task_cfg,
        hydra_cfg=composed.hydra,
        working_dir=os.getcwd(),
        task_name=str(composed.hydra.job.name),
    )
    if outcome.status == "FINISHED":
        ret.status = JobStatus.COMPLETED
        ret.return_value = return_value(outcome.metrics, objective)
    else:
        ret.status = JobStatus.FAILED
        ret.return_value = SweepError(
            f"run [{job.name}] failed: {outcome.error} (MLflow run {outcome.run_id}; its "
            "error.txt holds the traceback)"
        )
    return ret
