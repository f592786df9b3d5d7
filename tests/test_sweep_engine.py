"""The multirun engine end to end through `python -m sweep -m`, on the test process's Ray instance,
with the stand-in runner of conftest_sweep (instant runs, failures on demand)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest
from conftest_sweep import (
    RUNNER,
    assert_no_metric_lost,
    empty_store,
    kill,
    launch,
    run_sweep,
    search,
    start_sweep,
)

EXP = "engine"


def uri(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlflow.db"


def calls(tmp: Path) -> list[str]:
    path = tmp / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def runs_by_status(tmp: Path) -> Counter:
    return Counter(r.info.status for r in search(uri(tmp), EXP, "tags.role = 'run'"))


def finished_keys(tmp: Path) -> dict[str, str]:
    runs = search(uri(tmp), EXP, "tags.role = 'run' and attributes.status = 'FINISHED'")
    keys = Counter(r.data.tags["run_key"] for r in runs)
    assert max(keys.values(), default=1) == 1, f"a run key finished twice: {keys}"
    return {r.data.tags["run_key"]: r.info.run_id for r in runs}


@pytest.mark.slow
def test_failures_are_recorded_dead_actors_retried_and_relaunch_resumes(tmp_path, ray_head):
    """seed 13 raises, seed 77 runs out of memory (both FAILED with their message, the sweep
    goes on), seed 66 SIGKILLs its actor mid-run once (retried on a new actor, no duplicate,
    no metric lost)."""
    empty_store(tmp_path)
    args = [
        "-m",
        f"sweep.runner={RUNNER}",
        f"mlflow.experiment={EXP}",
        "seed=0,13,66,77",
        "cache=frac_10,frac_25",
    ]
    first = run_sweep(args, tmp_path, ray=ray_head, FAKE_DIR=str(tmp_path))
    out = first.stdout + first.stderr
    # Four runs raise: the sweep finishes the others, then exits non-zero naming a failed run.
    assert first.returncode == 1, out
    assert "boom for seed=13" in out and "failed" in out

    parents = search(uri(tmp_path), EXP, "tags.role = 'sweep'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.data.metrics["runs_failed"] == 4 and parent.data.metrics["runs_finished"] == 4
    children = search(uri(tmp_path), EXP, "tags.role = 'run'")
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    # The actor that died took one attempt with it (KILLED); the retry finished on a new actor.
    assert Counter(r.info.status for r in children) == {"FINISHED": 4, "FAILED": 4, "KILLED": 1}
    killed = next(r for r in children if r.info.status == "KILLED")
    assert "actor died" in killed.data.tags["error"] and "seed=66" in killed.data.tags["overrides"]
    for run in children:
        if run.info.status == "FINISHED":
            assert_no_metric_lost(uri(tmp_path), run)
        if run.info.status == "FAILED":
            assert run.data.tags["error"].startswith(("RuntimeError: boom", "MemoryError: out of"))
    # Each actor loaded the model once (two actors, plus the replacement of the dead one).
    log = calls(tmp_path)
    assert sum(line.startswith("load ") for line in log) <= 3
    done = finished_keys(tmp_path)
    assert len(done) == 4

    # Relaunch: finished runs are skipped, the failed ones run again, one parent throughout
    # (a ray.* setting is not part of the sweep's identity: one actor is enough for four runs).
    mark = len(log)
    second = run_sweep([*args, "ray.num_actors=1"], tmp_path, ray=ray_head, FAKE_DIR=str(tmp_path))
    assert second.returncode == 1
    rerun = [line for line in calls(tmp_path)[mark:] if line.startswith("run ")]
    assert sorted(line.split()[1] for line in rerun) == ["seed=13"] * 2 + ["seed=77"] * 2
    assert finished_keys(tmp_path) == done
    assert len(search(uri(tmp_path), EXP, "tags.role = 'sweep'")) == 1
    assert "4 finished already" in second.stdout + second.stderr


@pytest.mark.slow
def test_an_actor_dying_inside_a_replay_unit_keeps_the_replayed_runs(tmp_path, ray_head):
    """Three jobs share one stream: the actor records it, replays frac_10, then dies replaying
    frac_25. frac_10 stays FINISHED; the rest is dispatched again and replays the stored stream
    without another model pass."""
    empty_store(tmp_path)
    args = [
        "-m",
        "sweep.runner=tests.replay_runner",
        f"mlflow.experiment={EXP}",
        "cache=frac_10,frac_25,frac_50",
    ]
    res = run_sweep(args, tmp_path, ray=ray_head, FAKE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    children = search(uri(tmp_path), EXP, "tags.role = 'run'")
    # KILLED: the attempt at frac_25 and the not yet started frac_50 of the lost unit.
    assert Counter(r.info.status for r in children) == {"FINISHED": 3, "KILLED": 2}
    assert all(r.data.tags.get("replayed_from") for r in children if r.info.status == "FINISHED")
    log = calls(tmp_path)
    assert sum(line.startswith("record ") for line in log) == 1
    assert sum(line.startswith("replay frac=0.1 ") for line in log) == 1
    assert sum(line.startswith("replay frac=0.25 ") for line in log) == 2
    assert len(finished_keys(tmp_path)) == 3


@pytest.mark.slow
def test_driver_killed_mid_sweep_then_relaunched_recomputes_nothing_finished(tmp_path, ray_head):
    empty_store(tmp_path)
    args = ["-m", f"sweep.runner={RUNNER}", f"mlflow.experiment={EXP}", "seed=0,1,2,3,4,5,6,7"]
    env = {"FAKE_DIR": str(tmp_path), "FAKE_SLEEP": "2"}
    driver = start_sweep(args, tmp_path, ray=ray_head, **env)
    try:
        deadline = time.monotonic() + 120
        # Watch the runner's log, not the store: opening an SQLite store while the driver is
        # still creating its tables races with it. Four runs started = both actors are on their
        # second run (2 s each), so two runs are finished and two are half-way.
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if sum(line.startswith("run ") for line in calls(tmp_path)) >= 4:
                break
        else:
            pytest.fail(
                "no run finished in time:\n" + (driver.stdout.read() if driver.stdout else "")
            )
    finally:
        kill(driver)
    # Ray ends the killed driver's actors; wait until they are quiet.
    quiet_since, seen = time.monotonic(), len(calls(tmp_path))
    while time.monotonic() - quiet_since < 4:
        time.sleep(0.5)
        if len(calls(tmp_path)) != seen:
            quiet_since, seen = time.monotonic(), len(calls(tmp_path))
    before = finished_keys(tmp_path)
    assert 2 <= len(before) < 8, "kill the driver mid-sweep, not after it"
    stale = runs_by_status(tmp_path)["RUNNING"]  # left behind by the killed driver
    mark = len(calls(tmp_path))

    again = run_sweep(args, tmp_path, ray=ray_head, **env)
    assert again.returncode == 0, again.stdout + again.stderr
    after = finished_keys(tmp_path)
    assert len(after) == 8
    assert {k: after[k] for k in before} == before  # the finished runs are the same MLflow runs
    rerun = [line.split()[1] for line in calls(tmp_path)[mark:] if line.startswith("run ")]
    assert len(rerun) == 8 - len(before)
    statuses = runs_by_status(tmp_path)
    assert statuses["FINISHED"] == 8 and statuses["RUNNING"] == 0
    assert statuses["KILLED"] == stale  # what the killed driver left RUNNING is closed


@pytest.mark.slow
def test_actors_that_cannot_start_stop_the_sweep_with_a_clear_message(tmp_path, ray_head):
    empty_store(tmp_path)
    args = ["-m", f"sweep.runner={RUNNER}", f"mlflow.experiment={EXP}", "seed=0,1,2"]
    res = run_sweep(args, tmp_path, ray=ray_head, FAKE_DIR=str(tmp_path), FAKE_BROKEN_NODE="1")
    assert res.returncode == 1
    assert "Ray actors cannot start" in res.stderr and "lacks the runner's" in res.stderr
    assert runs_by_status(tmp_path)["RUNNING"] == 0


# Launches that stop before any work run in this process (conftest_sweep.launch): a Ray
# instance or a store they made would show in its output or in tmp_path all the same.


def test_invalid_job_fails_before_any_work(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    t0 = time.monotonic()
    code, out = launch(["-m", "bits.low=8", "bits.high=4", "cache=frac_10,frac_25"], capfd)
    assert code == 1
    assert "bits.low" in out and "must be below bits.high=4" in out
    assert "Started a local Ray instance" not in out
    assert not (tmp_path / "mlflow.db").exists()
    assert time.monotonic() - t0 < 60


def test_unreachable_tracking_server_fails_fast_in_a_multirun(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    args = ["-m", f"sweep.runner={RUNNER}", "mlflow.tracking_uri=http://127.0.0.1:9", "seed=0,1"]
    code, out = launch(args, capfd)
    assert code == 1
    assert "mlflow.tracking_uri=http://127.0.0.1:9 is unreachable" in out
    assert "Started a local Ray instance" not in out


def test_settings_cannot_vary_inside_one_multirun(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    code, out = launch(["-m", f"sweep.runner={RUNNER}", "mlflow.experiment=a,b"], capfd)
    assert code == 1 and "mlflow.* differs between the jobs" in out


@pytest.mark.slow
@pytest.mark.parametrize(
    "multirun, signum, status",
    [
        (False, "SIGINT", 130),
        (True, "SIGTERM", 143),
    ],
)
def test_ctrl_c_and_sigterm_end_in_one_line_and_the_runs_in_flight_killed(
    tmp_path, ray_head, multirun, signum, status
):
    import signal

    empty_store(tmp_path)
    args = ["-m", "seed=0,1"] if multirun else ["seed=0"]
    args += [f"sweep.runner={RUNNER}", f"mlflow.experiment={EXP}"]
    driver = start_sweep(args, tmp_path, ray=ray_head, FAKE_DIR=str(tmp_path), FAKE_SLEEP="30")
    deadline = time.monotonic() + 120
    while not any(line.startswith("run ") for line in calls(tmp_path)):
        assert time.monotonic() < deadline and driver.poll() is None, driver.stdout.read()
        time.sleep(0.2)
    driver.send_signal(getattr(signal, signum))
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == status, out
    assert "Traceback" not in out and out.rstrip().splitlines()[-1].startswith("interrupted:")
    statuses = runs_by_status(tmp_path)
    assert statuses["KILLED"] >= 1 and statuses["RUNNING"] == 0, statuses
