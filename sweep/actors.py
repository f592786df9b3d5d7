"""Long-lived Ray actors that keep models loaded, and the driver-side loop that feeds them.

Each actor runs one unit at a time: a job, or the jobs that share a request stream (one model
pass, then a replay each). A free actor takes the next unit of a load key it already holds, so a
model is loaded once per actor and serves every run that can reuse it; only when its keys are
exhausted does it move to the key with the most pending work per actor already on it. An actor
that dies (OOM, segfault, lost node) is replaced and the unfinished jobs of its unit dispatched
again, up to `max_actor_failures` times; a run that merely raises is a FAILED outcome from a
healthy actor.

Every job is claimed through the driver's ledger (sweep.ledger) right before dispatch; a job whose
run key another live driver holds is parked and looked at again every few seconds, until that
driver has finished it (the outcome is taken from the store) or is gone (the job is claimed and
run here).
"""

from __future__ import annotations

import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from sweep import worker
from sweep.cluster import Plan
from sweep.errors import SweepError
from sweep.jobs import Job, Outcome, load_runner
from sweep.ledger import RECHECK_S
from sweep.progress import teller
from sweep.tracking import RunRecord, Tracker


class RunActor:
    def __init__(
        self,
        runner: str,
        models_per_actor: int,
        tracking_uri: str,
        experiment_id: str,
        reuse_streams: bool = True,
        mrc_points: int = 0,
        optimality: bool = True,
    ):
        self.runner = load_runner(runner)
        self.models = worker.ModelCache(models_per_actor)
        self.tracker = Tracker(tracking_uri, experiment_id)
        self.reuse_streams, self.mrc_points = reuse_streams, mrc_points
        self.optimality = optimality
        # Each pass's progress by its first job's index, read by the driver (`passes`) from the
        # actor's second thread while the pass runs.
        self.progress: dict[int, tuple[int, int, int, int]] = {}

    def stream_bytes(self, unit: list[Job], records: list[RunRecord]):
        """A unit's streams for replays on other workers (sweep.worker.stream_bytes)."""
        progress = teller(self.progress, unit[0].index, len(unit))
        return worker.stream_bytes(
            self.runner, self.models, unit, records, self.tracker, self.reuse_streams, progress
        )

    def passes(self, keys: list[int]) -> dict[int, tuple[int, int, int, int]]:
        """The progress of the passes `keys` (those in flight); the others are forgotten."""
        for key in set(self.progress) - set(keys):  # in place: the tellers hold this dict
            del self.progress[key]
        return dict(self.progress)

    def execute(self, unit: list[Job], records: list[RunRecord]) -> list[Outcome]:
        progress = teller(self.progress, unit[0].index, len(unit))
        if unit[0].stream_key is None:
            return [
                worker.execute(
                    self.runner, self.models, unit[0], records[0], self.tracker, progress
                )
            ]
        return worker.execute_group(
            self.runner,
            self.models,
            unit,
            records,
            self.tracker,
            self.reuse_streams,
            self.mrc_points,
            self.optimality,
            progress,
        )


@dataclass
class Member:
    handle: Any
    keys: list[str] = field(default_factory=list)  # load keys served, most recent last

    def serve(self, key: str, remember: int) -> None:
        if key in self.keys:
            self.keys.remove(key)
        self.keys.append(key)
        del self.keys[:-remember]


@dataclass
class InFlight:
    member: Member | None  # None: a replay task
    unit: list[Job]
    records: list[RunRecord]
    npz: Any = None  # each stream's bytes, when the unit's replays run as tasks


def replay_task(
    runner: str, tracking: tuple[str, str], npz: bytes, sha256: str, job, record, points: int,
    optimality: bool,
):  # fmt: skip
    """One replay on any CPU of the cluster, while the actors run the next model passes."""
    runner_module, tracker = load_runner(runner), Tracker(*tracking)
    return worker.replay_bytes(runner_module, npz, sha256, job, record, tracker, points, optimality)


class ActorPool:
    def __init__(
        self, plan: Plan, actor_args: tuple, models_per_actor: int, max_actor_failures: int
    ):
        """With `plan.replay_tasks` a unit's actor records its stream and the replays run as
        one-CPU Ray tasks, so the actor (and its GPU) goes on to the next pass; else the actor
        replays."""
        self.options = {
            "num_cpus": plan.num_cpus,
            "num_gpus": plan.num_gpus,
            "max_restarts": 0,
            # A second thread answers `passes` while the first runs a unit.
            "max_concurrency": 2,
        }
        self.actor_args = actor_args
        self.replay_task = ray.remote(num_cpus=1)(replay_task) if plan.replay_tasks else None
        self.remember = max(1, models_per_actor)
        self.max_actor_failures = max_actor_failures
        self.remote = ray.remote(RunActor)
        self.members: list[Member] = []
        self.inflight: dict[Any, InFlight] = {}
        # Passes that ended since the progress was last read: read once more, for their end.
        self.ended: list[tuple[Member, int]] = []
        self.grow(plan.actors)

    def grow(self, size: int) -> None:
        while len(self.members) < size:
            self.members.append(self._spawn())

    def _spawn(self) -> Member:
        return Member(self.remote.options(**self.options).remote(*self.actor_args))

    def passes(self) -> dict[int, tuple[int, int, int, int]]:
        """The progress of the model passes the actors run, by unit (its first job's index)."""
        keys: dict[int, tuple[Any, list[int]]] = {}
        running = [(s.member, s.unit[0].index) for s in self.inflight.values() if s.member]
        for member, key in [*running, *self.ended]:
            keys.setdefault(id(member), (member.handle, []))[1].append(key)
        self.ended = []
        asked = [handle.passes.remote(units) for handle, units in keys.values()]
        # An actor still starting answers later; the next read will have it.
        ready, _ = ray.wait(asked, num_returns=len(asked), timeout=0.5) if asked else ([], [])
        told: dict[int, tuple[int, int, int, int]] = {}
        for ref in ready:
            try:
                told.update(ray.get(ref))
            except RayError:  # a dead actor: the run loop deals with it
                pass
        return told

    def run(self, units: list[list[Job]], ledger: Any, on_change: Callable[[int, int, int], None]):
        """Execute the jobs of `units` (sweep.jobs.units_of: each one model pass or one run with
        the model in the loop); returns their outcomes by job index.

        ledger.claim(job) claims the job's run right before dispatch: its RunRecord, an Outcome
        when another driver finished it meanwhile, or None when a live driver holds it (parked);
        ledger.recheck(job) looks at a parked job again (an Outcome, True once free, else False);
        ledger.received(outcome) takes each outcome; ledger.lost(job, record, error, final)
        closes the run of a job whose actor died (final: no retry follows) and returns its
        outcome if the run had finished before; ledger.tick() is called about once a second.
        """
        queues: dict[str, deque[list[Job]]] = {}
        for unit in units:
            queues.setdefault(unit[0].load_key, deque()).append(unit)
        idle = list(self.members)
        deaths: Counter[int] = Counter()
        outcomes: dict[int, Outcome] = {}
        parked: dict[int, tuple[Job, float]] = {}  # job index -> (job, when to look again)
        while queues or self.inflight or parked:
            ledger.tick()
            for index, (job, due) in list(parked.items()):
                if time.monotonic() < due:
                    continue
                state = ledger.recheck(job)
                if isinstance(state, Outcome):
                    outcomes[index] = state
                elif state:
                    queues.setdefault(job.load_key, deque()).appendleft([job])
                else:
                    parked[index] = (job, time.monotonic() + random.uniform(*RECHECK_S))
                    continue
                del parked[index]
            while idle and queues:
                member = idle.pop()
                holders = Counter(
                    slot.member.keys[-1]
                    for slot in self.inflight.values()
                    if slot.member and slot.member.keys
                )
                key = pick_key(member.keys, queues, holders)
                unit = queues[key].popleft()
                if not queues[key]:
                    del queues[key]
                claimed, records = [], []
                for job in unit:
                    got = ledger.claim(job)
                    if isinstance(got, Outcome):
                        outcomes[job.index] = got
                    elif got is None:
                        parked[job.index] = (job, time.monotonic() + random.uniform(*RECHECK_S))
                    else:
                        claimed.append(job)
                        records.append(got)
                if not claimed:
                    idle.append(member)
                    continue
                member.serve(key, self.remember)
                if self.replay_task is not None and claimed[0].stream_key is not None:
                    streams = len({job.stream_key for job in claimed})
                    head, *npz = member.handle.stream_bytes.options(num_returns=1 + streams).remote(
                        claimed, records
                    )
                    self.inflight[head] = InFlight(member, claimed, records, npz)
                else:
                    self.inflight[member.handle.execute.remote(claimed, records)] = InFlight(
                        member, claimed, records
                    )
            ready = []
            if self.inflight:
                ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
            elif parked:
                time.sleep(0.5)
            for ref in ready:
                slot = self.inflight.pop(ref)
                if slot.member is None:
                    results = self._replayed(ref, slot, ledger)
                    for job, outcome in zip(slot.unit, results):
                        outcomes[job.index] = ledger.received(outcome)
                    continue
                self.ended.append((slot.member, slot.unit[0].index))
                try:
                    results = ray.get(ref)
                    idle.append(slot.member)
                    if slot.npz is not None and isinstance(results[0], RunRecord):
                        self._replay(slot, results)
                        results = []
                except RayActorError as err:
                    if err.actor_init_failed:
                        # Every actor would fail the same way (missing code or dependency on a
                        # node): stop instead of burning retries on each job.
                        for job, record in zip(slot.unit, slot.records):
                            ledger.lost(job, record, "the actor could not start", True)
                        raise SweepError(
                            "Ray actors cannot start: "
                            f"{str(err).strip().splitlines()[-1]}. On a cluster, install this "
                            "project on the nodes or ship it with +ray.runtime_env.working_dir=."
                        ) from None
                    self.members.remove(slot.member)
                    replacement = self._spawn()
                    self.members.append(replacement)
                    idle.append(replacement)
                    deaths[slot.unit[0].index] += 1
                    final = deaths[slot.unit[0].index] > self.max_actor_failures
                    error = f"actor died: {type(err).__name__}: {str(err).splitlines()[0]}"
                    retry = []
                    for job, record in zip(slot.unit, slot.records):
                        done = ledger.lost(job, record, error, final)
                        if done is None and not final:
                            retry.append(job)
                        else:
                            outcomes[job.index] = done or Outcome(
                                "FAILED", {}, run_id=record.run_id, error=error
                            )
                    if retry:
                        queues.setdefault(retry[0].load_key, deque()).appendleft(retry)
                    results = []
                except RayTaskError as err:
                    # The run's own errors are caught in the actor; this is the sweep's plumbing
                    # failing: record it, keep the actor.
                    idle.append(slot.member)
                    error = str(err).strip().splitlines()[-1]
                    results = [
                        ledger.lost(job, record, error, True)
                        or Outcome("FAILED", {}, run_id=record.run_id, error=error)
                        for job, record in zip(slot.unit, slot.records)
                    ]
                for job, outcome in zip(slot.unit, results):
                    outcomes[job.index] = ledger.received(outcome)
            finished = sum(o.status == "FINISHED" for o in outcomes.values())
            running = sum(len(slot.unit) for slot in self.inflight.values()) + len(parked)
            on_change(running, finished, len(outcomes) - finished)
        return outcomes

    def _replay(self, slot: InFlight, heads: list[RunRecord]) -> None:
        """Dispatch one replay task per job of a unit whose actor returned its streams: the
        first record of each stream key's jobs, as the actor tagged it, and each stream's
        bytes."""
        runner, _, uri, experiment, _, points, optimality = self.actor_args
        parts = worker.by_stream(slot.unit, slot.records)
        for (jobs, records), head, npz in zip(parts, heads, slot.npz):
            for n, (job, record) in enumerate(zip(jobs, [head, *records[1:]])):
                ref = self.replay_task.remote(
                    runner, (uri, experiment), npz, head.tags["stream_sha256"], job, record,
                    points if n == 0 else 0, optimality,
                )  # fmt: skip
                self.inflight[ref] = InFlight(None, [job], [record])

    @staticmethod
    def _replayed(ref, slot: InFlight, ledger) -> list[Outcome]:
        try:
            return [ray.get(ref)]
        except RayError as err:  # the task's own errors are FAILED runs; this is its worker
            error = f"replay task failed: {str(err).strip().splitlines()[-1]}"
            job, record = slot.unit[0], slot.records[0]
            return [
                ledger.lost(job, record, error, True)
                or Outcome("FAILED", {}, run_id=record.run_id, error=error)
            ]


def pick_key(held: list[str], queues: dict[str, deque[Job]], holders: Mapping[str, int]) -> str:
    """The load key a free actor serves next: the most recent one it holds that has work, else
    the key with the most pending jobs per actor already serving it."""
    for key in reversed(held):
        if key in queues:
            return key
    return max(queues, key=lambda k: len(queues[k]) / (1 + holders.get(k, 0)))
