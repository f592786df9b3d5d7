"""What a driver writes to the tracking store, and what it does when the store is away.

One ledger per driver process (a multirun or a single run):
- at launch, it pushes what an earlier launch left in the spool (sweep.sync), then reads which
  run keys are done: FINISHED in the store, or FINISHED in the spool (never computed again);
- before dispatch it claims each job's run key (sweep.tracking.Tracker.claim, tagged with this
  driver's identity, sweep.drivers) and keeps the claims' heartbeat while they are in flight, so
  that drivers on one store neither compute a run twice nor kill each other's live runs;
- a record the store cannot take goes to the spool; while the store is away, jobs are dispatched
  without a claim (their runs are made when their records are pushed) and the spool is tried
  again every RETRY_S; at the end of a sweep it waits up to mlflow.outage_wait_s for the store,
  then stops naming the spooled runs and how to push them.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from omegaconf import DictConfig

from sweep.drivers import Driver, Heartbeat
from sweep.errors import SweepError
from sweep.jobs import RESULT_METRICS, Job, Outcome
from sweep.sync import Spool, describe
from sweep.tracking import (
    STORE_ERRORS,
    RunRecord,
    Tracker,
    git_commit,
    new_record,
    parent_record,
    stored_metrics,
)

log = logging.getLogger(__name__)
# Seconds between two tries of a store that is away.
RETRY_S = 10.0
# Seconds between two looks at a run key another driver holds (random, so that two drivers that
# withdrew their claims on one key at the same moment do not collide again).
RECHECK_S = (1.0, 4.0)


class Ledger:
    def __init__(self, cfg: DictConfig) -> None:
        self.tracker = Tracker.open(
            cfg.mlflow.tracking_uri, cfg.mlflow.experiment, cfg.mlflow.artifact_location
        )
        self.experiment = str(cfg.mlflow.experiment)
        self.outage_wait_s = float(cfg.mlflow.outage_wait_s)
        self.resume = bool(cfg.sweep.resume)
        self.spool = Spool(cfg.mlflow.spool)
        self.driver = Driver.this_process()
        self.heartbeat = Heartbeat(self.tracker.client)
        self.commit = git_commit()
        self.parent_id: str | None = None
        self.sweep_id = ""
        self.away_since: float | None = None  # when the store last failed; None: it answers
        self.next_try = 0.0
        self._told: set[str] = set()
        left = self.push_spool()
        self.spooled_done = {
            e.record.key: Outcome("FINISHED", _result_metrics(e.record), run_id=e.record.run_id)
            for e in left
            if e.record.key and e.record.status == "FINISHED"
        }
        if left:
            log.warning(
                f"{len(left)} results from an earlier launch wait in the spool {self.spool.folder}"
                f" ({left[0].error}); they count as done and are pushed when the store takes them"
            )

    # --- what is done ---------------------------------------------------------------------

    def done(self) -> dict[str, Outcome]:
        """Run key -> its finished run, in the store or in the spool."""
        with self._reading():
            done = {key: _finished(run) for key, run in self.tracker.finished().items()}
        return {**self.spooled_done, **done}

    def open_parent(self, sweep_id: str, name: str) -> str:
        self.sweep_id = sweep_id
        with self._reading():
            self.parent_id = self.tracker.open_parent(sweep_id, name, self.commit)
        return self.parent_id

    @contextmanager
    def _reading(self) -> Iterator[None]:
        """At launch the store must answer: what is done decides what runs."""
        try:
            yield
        except STORE_ERRORS as err:
            raise SweepError(
                f"mlflow.tracking_uri={self.tracker.uri}: {self.tracker.failure(err)}"
            ) from None

    def reopen_parent(self) -> None:
        """The next batch of the same sweep (Optuna sends many)."""
        try:
            self.tracker.client.update_run(self.parent_id, status="RUNNING")
        except STORE_ERRORS as err:
            self._away(self.tracker.failure(err))

    # --- claims ---------------------------------------------------------------------------

    def claim(self, job: Job) -> RunRecord | Outcome | None:
        """The job's record, claimed (or unclaimed while the store is away); an Outcome when
        another driver finished it meanwhile; None while a live driver holds it."""
        record = new_record(
            job, self.parent_id, self.sweep_id, self.commit, self.driver.tags(), self.resume
        )
        if self.away_since is not None:
            return record
        try:
            state = self.tracker.claim(record)
        except STORE_ERRORS as err:
            self._away(self.tracker.failure(err))
            return record
        if state.finished is not None:
            return _finished(state.finished)
        if state.holder is not None:
            self._tell_held(job, state.holder)
            return None
        self.heartbeat.add(state.run_id)
        return record

    def claim_or_wait(self, job: Job) -> RunRecord | Outcome:
        """claim(), waiting for as long as a live driver holds the job."""
        got = self.claim(job)
        while got is None:
            time.sleep(random.uniform(*RECHECK_S))
            state = self.recheck(job)
            got = state if isinstance(state, Outcome) else self.claim(job) if state else None
        return got

    def recheck(self, job: Job) -> Outcome | bool:
        """A parked job: its outcome once another driver finished it, True once free."""
        try:
            state = self.tracker.key_state(job.key, driver=self.driver.id, resume=self.resume)
        except STORE_ERRORS as err:
            self._away(self.tracker.failure(err))
            return False
        if state.finished is not None:
            return _finished(state.finished)
        return state.holder is None

    def _tell_held(self, job: Job, holder: Any) -> None:
        if job.key not in self._told:
            self._told.add(job.key)
            tags = holder.data.tags
            log.info(
                f"run [{job.name}] is being computed by another driver (pid "
                f"{tags.get('driver_pid')} on {tags.get('driver_host', '?').split('/')[0]}, MLflow "
                f"run {holder.info.run_id}); waiting for it"
            )

    # --- outcomes -------------------------------------------------------------------------

    def received(self, outcome: Outcome) -> Outcome:
        self.heartbeat.discard(outcome.run_id)
        if outcome.record is not None:
            self.keep(outcome.record, outcome.store_error or "")
            outcome.record = None
        return outcome

    def lost(self, job: Job, record: RunRecord, error: str, final: bool) -> Outcome | None:
        """Close the run of a job whose actor died; its outcome if it had finished."""
        self.heartbeat.discard(record.run_id)
        if record.run_id is None:
            return None
        try:
            run = self.tracker.client.get_run(record.run_id)
            if run.info.status == "FINISHED":
                return _finished(run)
        except STORE_ERRORS:
            pass  # the record below goes to the spool
        log.warning(f"run [{job.name}]: {error}" + ("" if final else "; dispatching it again"))
        closed = RunRecord(job.key, job.name, record.run_id)
        self.save(closed.fail(error, "FAILED" if final else "KILLED"))
        return None

    def save(self, record: RunRecord) -> None:
        """Push a record the driver made; spooled if the store cannot take it."""
        try:
            self.tracker.push(record)
        except STORE_ERRORS as err:
            self.keep(record, self.tracker.failure(err))

    def keep(self, record: RunRecord, error: str) -> None:
        self.spool.put(record, self.tracker.uri, self.experiment, error)
        self._away(error)

    def _away(self, why: str) -> None:
        if self.away_since is None:
            self.away_since = time.monotonic()
            self.next_try = self.away_since + RETRY_S
            log.warning(
                f"the tracking store {self.tracker.uri} cannot be written ({why});"
                f" results are kept in {self.spool.folder} and pushed when it answers"
            )

    def tick(self) -> None:
        """While the store is away: every RETRY_S, try to push the spool."""
        if self.away_since is None or time.monotonic() < self.next_try:
            return
        self.next_try = time.monotonic() + RETRY_S
        entries = self.spool.entries(self.tracker.uri, self.experiment)
        if self.tracker.answers() and not self.spool.push(entries, self.tracker):
            log.warning(f"the tracking store {self.tracker.uri} answers again; spool pushed")
            self.away_since = None

    def push_spool(self) -> list:
        """Push this store's spooled records; returns the entries left."""
        entries = self.spool.entries(self.tracker.uri, self.experiment)
        if not entries or not self.tracker.answers():
            return entries
        return self.spool.push(entries, self.tracker)

    # --- the end --------------------------------------------------------------------------

    def close_parent(self, status: str, counts: dict[str, int], table: str) -> None:
        self.save(parent_record(self.parent_id, status, counts, table))

    def kill_in_flight(self, run_ids: list[str | None]) -> None:
        """On the way out (Ctrl-C, a driver error): no run of this driver left RUNNING; the
        relaunch computes them again. The store may be what broke: a failure ends the attempt
        (a relaunch sees these runs' driver gone and closes them itself)."""
        try:
            for run_id in filter(None, run_ids):  # None: a run the store never made
                if self.tracker.client.get_run(run_id).info.status == "RUNNING":
                    self.tracker.client.set_terminated(run_id, "KILLED")
            if self.parent_id:
                self.tracker.client.set_terminated(self.parent_id, "KILLED")
        except STORE_ERRORS:
            pass

    def drain(self) -> None:
        """At the end: every spooled result of this store pushed, waiting for the store up to
        mlflow.outage_wait_s; otherwise stop, naming the spooled runs and how to push them."""
        left = self.push_spool()
        deadline = time.monotonic() + self.outage_wait_s
        if left and self.outage_wait_s > 0:
            log.warning(
                f"{len(left)} results wait in {self.spool.folder}; trying the tracking store "
                f"{self.tracker.uri} for up to {self.outage_wait_s:g} s"
            )
        while left and time.monotonic() < deadline:
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            left = self.push_spool()
        if not left:
            self.away_since = None
            return
        runs = [e for e in left if e.record.key]
        what = f"{len(runs)} runs" if runs else "the sweep's parent run"
        raise SweepError(
            f"the tracking store {self.tracker.uri} did not take {what} ({left[0].error}); "
            f"their results are safe in {self.spool.folder}:\n"
            + describe(runs or left)
            + f"\nPush them with `python -m sweep.sync {self.spool.folder}` once the store "
            "answers, or relaunch the same command: it pushes them first and computes none of "
            "them again"
        )


def _finished(run: Any) -> Outcome:
    return Outcome("FINISHED", stored_metrics(run), run_id=run.info.run_id)


def _result_metrics(record: RunRecord) -> dict[str, float]:
    return {n: v for n, v, _, step in record.metrics if step == 0 and n in RESULT_METRICS}
