"""Long-lived Ray actors that keep models loaded, and the driver-side loop that feeds them.

Each actor runs one unit at a time: a job, or the jobs that share a request stream (one model
pass, then a replay each). A free actor takes the next unit of a load key it already holds, so a
model is loaded once per actor and serves every run that can reuse it; only when its keys are
exhausted does it move to the key with the most pending work per actor already on it. An actor
that dies (OOM, segfault, lost node) is replaced and the unfinished jobs of its unit dispatched
again, up to `max_actor_failures` times; a run that merely raises is a FAILED outcome from a
healthy actor.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayTaskError

from sweep import worker
from sweep.cluster import Plan
from sweep.errors import SweepError
from sweep.jobs import Job, Outcome, load_runner
from sweep.tracking import Tracker


class RunActor:
    def __init__(
        self,
        runner: str,
        models_per_actor: int,
        tracking_uri: str,
        experiment_id: str,
        reuse_streams: bool = True,
        mrc_points: int = 0,
    ):
        self.runner = load_runner(runner)
        self.models = worker.ModelCache(models_per_actor)
        self.tracker = Tracker(tracking_uri, experiment_id)
        self.reuse_streams, self.mrc_points = reuse_streams, mrc_points

    def execute(self, unit: list[Job], run_ids: list[str]) -> list[Outcome]:
        if unit[0].stream_key is None:
            return [worker.execute(self.runner, self.models, unit[0], run_ids[0], self.tracker)]
        return worker.execute_group(
            self.runner,
            self.models,
            unit,
            run_ids,
            self.tracker,
            self.reuse_streams,
            self.mrc_points,
        )


def units_of(jobs: list[Job]) -> list[list[Job]]:
    """Jobs with one stream key form one unit; every other job is a unit of its own."""
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
    return units


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
    member: Member
    unit: list[Job]
    run_ids: list[str]


class ActorPool:
    def __init__(
        self, plan: Plan, actor_args: tuple, models_per_actor: int, max_actor_failures: int
    ):
        self.options = {"num_cpus": plan.num_cpus, "num_gpus": plan.num_gpus, "max_restarts": 0}
        self.actor_args = actor_args
        self.remember = max(1, models_per_actor)
        self.max_actor_failures = max_actor_failures
        self.remote = ray.remote(RunActor)
        self.members: list[Member] = []
        self.inflight: dict[Any, InFlight] = {}
        self.grow(plan.actors)

    def grow(self, size: int) -> None:
        while len(self.members) < size:
            self.members.append(self._spawn())

    def _spawn(self) -> Member:
        return Member(self.remote.options(**self.options).remote(*self.actor_args))

    def run(
        self,
        jobs: list[Job],
        start_run: Callable[[Job], str],
        lost_run: Callable[[Job, str, str, bool], Outcome | None],
        on_change: Callable[[int, int, int], None],
    ) -> dict[int, Outcome]:
        """Execute jobs; returns their outcomes by job index.

        start_run(job) creates the job's MLflow run right before dispatch; lost_run(job, run_id,
        error, final) closes the run of a job whose actor died (final: no retry follows) and
        returns its outcome if the run had finished before the actor died.
        """
        queues: dict[str, deque[list[Job]]] = {}
        for unit in units_of(jobs):
            queues.setdefault(unit[0].load_key, deque()).append(unit)
        idle = list(self.members)
        deaths: Counter[int] = Counter()
        outcomes: dict[int, Outcome] = {}
        while queues or self.inflight:
            while idle and queues:
                member = idle.pop()
                holders = Counter(
                    slot.member.keys[-1] for slot in self.inflight.values() if slot.member.keys
                )
                key = pick_key(member.keys, queues, holders)
                unit = queues[key].popleft()
                if not queues[key]:
                    del queues[key]
                run_ids = [start_run(job) for job in unit]
                member.serve(key, self.remember)
                self.inflight[member.handle.execute.remote(unit, run_ids)] = InFlight(
                    member, unit, run_ids
                )
            ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
            for ref in ready:
                slot = self.inflight.pop(ref)
                try:
                    results = ray.get(ref)
                    idle.append(slot.member)
                except RayActorError as err:
                    if err.actor_init_failed:
                        # Every actor would fail the same way (missing code or dependency on a
                        # node): stop instead of burning retries on each job.
                        for job, run_id in zip(slot.unit, slot.run_ids):
                            lost_run(job, run_id, "the actor could not start", True)
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
                    for job, run_id in zip(slot.unit, slot.run_ids):
                        done = lost_run(job, run_id, error, final)
                        if done is None and not final:
                            retry.append(job)
                        else:
                            outcomes[job.index] = done or Outcome(
                                "FAILED", {}, run_id=run_id, error=error
                            )
                    if retry:
                        queues.setdefault(retry[0].load_key, deque()).appendleft(retry)
                    results = []
                except RayTaskError as err:
                    # The run's own errors are caught in the actor; this is the sweep's plumbing
                    # failing (e.g. the tracking store went away): record it, keep the actor.
                    idle.append(slot.member)
                    error = str(err).strip().splitlines()[-1]
                    results = [
                        lost_run(job, run_id, error, True)
                        or Outcome("FAILED", {}, run_id=run_id, error=error)
                        for job, run_id in zip(slot.unit, slot.run_ids)
                    ]
                for job, outcome in zip(slot.unit, results):
                    outcomes[job.index] = outcome
            finished = sum(o.status == "FINISHED" for o in outcomes.values())
            running = sum(len(slot.unit) for slot in self.inflight.values())
            on_change(running, finished, len(outcomes) - finished)
        return outcomes


def pick_key(held: list[str], queues: dict[str, deque[Job]], holders: Mapping[str, int]) -> str:
    """The load key a free actor serves next: the most recent one it holds that has work, else
    the key with the most pending jobs per actor already serving it."""
    for key in reversed(held):
        if key in queues:
            return key
    return max(queues, key=lambda k: len(queues[k]) / (1 + holders.get(k, 0)))
