"""Faults around a sweep, end to end through `python -m sweep -m` with the stand-in runner of
conftest_sweep: two drivers on one sweep, a tracking server that goes away mid-sweep, and folders
that are read-only or full. The local engine is also checked to listen on loopback only."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest_sweep import (
    RUNNER,
    assert_no_metric_lost,
    descendants,
    free_port,
    is_loopback,
    launch,
    search,
    sockets_of,
    start_mlflow_server,
    start_sweep,
    stop_server,
    sweep_env,
)

EXP = "faults"


def calls(tmp: Path, prefix: str) -> list[str]:
    path = tmp / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.split()[1] for line in lines if line.startswith(prefix)]


def wait_for(condition, what: str, procs: list[subprocess.Popen], timeout_s: float = 120) -> None:
    """Poll `condition` every 0.2 s while the processes `procs` run, for at most timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        ended = [p for p in procs if p.poll() is not None]
        assert not ended, f"ended before {what}:\n" + "".join(p.stdout.read() for p in ended)
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def check_store(uri: str, seeds: int) -> list:
    """Each run key FINISHED exactly once, no run RUNNING, no metric lost; the finished runs."""
    runs = search(uri, EXP, "tags.role = 'run'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    keys = Counter(r.data.tags["run_key"] for r in finished)
    assert len(keys) == seeds and set(keys.values()) == {1}, keys
    assert not [r for r in runs if r.info.status == "RUNNING"]
    for run in finished:
        assert_no_metric_lost(uri, run)
    return finished


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait(timeout=30)


@pytest.mark.slow
def test_two_drivers_on_one_multirun_compute_each_run_once_on_loopback_only(tmp_path):
    """Both start at the same moment on a fresh store: one creates it while the other waits,
    they share one parent run, every run key is claimed by one of them and FINISHED exactly
    once, neither kills the other's runs, and each ends with the whole sweep's results."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["-m", f"sweep.runner={RUNNER}", f"mlflow.experiment={EXP}", "ray.num_actors=1"]
    args.append("seed=0,1,2,3,4,5,6,7")
    env = {"FAKE_DIR": str(tmp_path), "FAKE_SLEEP": "1"}
    drivers = [start_sweep(args, tmp_path, **env) for _ in range(2)]
    try:
        wait_for(lambda: len(calls(tmp_path, "run ")) >= 1, "the first run", drivers)
        # Every socket of both drivers and of the Ray instances they started, while they run.
        sockets = sockets_of(descendants({d.pid for d in drivers}))
        assert sum(listening for *_, listening in sockets) >= 4, sockets  # Ray's servers
        assert [s for s in sockets if not is_loopback(s[1])] == []
        outs = [d.communicate(timeout=240)[0] for d in drivers]
    finally:
        stop_all(drivers)
    assert [d.returncode for d in drivers] == [0, 0], "\n".join(outs)
    assert sorted(calls(tmp_path, "run ")) == [f"seed={i}" for i in range(8)]  # each ran once
    check_store(uri, 8)
    runs = search(uri, EXP, "tags.role = 'run'")
    assert Counter(r.info.status for r in runs) == {"FINISHED": 8}  # nothing KILLED
    parents = search(uri, EXP, "tags.role = 'sweep'")
    assert len(parents) == 1 and not search(uri, EXP, "tags.role = 'sweep-candidate'")
    assert parents[0].data.metrics["runs_finished"] == 8
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parents[0].info.run_id}
    for out in outs:
        rows = re.findall(r"^seed=\d\s+FINISHED", out, flags=re.M)
        assert len(rows) == 8, out  # each driver reports the whole sweep


@pytest.mark.slow
def test_a_tracking_server_away_mid_sweep_loses_nothing_and_recomputes_nothing(tmp_path, ray_head):
    """Any tracking URI, here an `mlflow server`, artifacts uploaded through it. The server
    stops after two runs and stays away for longer than the client's retries: the sweep
    computes on, spools what the server cannot take (files too), and pushes all of it once the
    server is back."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    args = [
        "-m",
        f"sweep.runner={RUNNER}",
        f"mlflow.experiment={EXP}",
        f"mlflow.tracking_uri={url}",
        "mlflow.outage_wait_s=150",
        "seed=0,1,2,3,4,5",
        "trace=true",
    ]
    # One retry a request: the client soon finds the server gone, rather than after MLflow's
    # default of several retries with growing waits.
    retries = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    # Seeds 2-5 finish only once the server is gone, however busy the machine: had they raced
    # the server's stop, the sweep could end with fewer than three results to spool.
    gate = tmp_path / "server-stopped"
    env = {"FAKE_DIR": str(tmp_path), **retries}
    env |= {"FAKE_GATE": str(gate), "FAKE_GATE_FROM": "2"}
    spool = tmp_path / "mlflow-spool"
    driver = start_sweep(args, tmp_path, ray=ray_head, **env)
    try:
        wait_for(lambda: len(calls(tmp_path, "done ")) >= 2, "two runs", [driver])
        stop_server(server)
        away = time.monotonic()
        gate.touch()
        # Results computed while the server is away, each after the client gave up on it.
        wait_for(lambda: len(list(spool.glob("*/record.json"))) >= 3, "the spool", [driver])
        # Away for several times the client's retries (one retry, 1 s back-off).
        time.sleep(max(0.0, 4 - (time.monotonic() - away)))
        server = start_mlflow_server(tmp_path, port)
        out = driver.communicate(timeout=240)[0]
    finally:
        stop_all([driver])
    try:
        assert driver.returncode == 0, out
        assert "results are kept in" in out and "Traceback" not in out
        assert sorted(calls(tmp_path, "run ")) == [f"seed={i}" for i in range(6)]
        assert not list(spool.glob("*/record.json"))
        from mlflow.tracking import MlflowClient

        client = MlflowClient(url)
        for run in check_store(url, 6):
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert names == {"config.yaml", "trace.parquet", "problems.json"}, names
        assert len(list((tmp_path / "artifacts").rglob("trace.parquet"))) == 6
        parent = search(url, EXP, "tags.role = 'sweep'")[0]
        assert parent.info.status == "FINISHED" and parent.data.metrics["runs_finished"] == 6
    finally:
        stop_server(server)


def mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)])
    if done.returncode:
        pytest.skip("needs to mount a tmpfs (root)")


@pytest.mark.slow
def test_read_only_and_full_folders_stop_the_launch_in_one_line(
    tmp_path, ray_head, monkeypatch, capfd
):
    read_only, full = tmp_path / "ro", tmp_path / "full"
    if os.geteuid():
        read_only.mkdir(mode=0o555)
    else:
        mount_tmpfs(read_only, "ro,size=1m")
    try:
        # The launches that stop before any work run in this process (conftest_sweep.launch).
        monkeypatch.chdir(read_only)
        code, out = launch(["eval.limit=1"], capfd)
        assert code == 1 and "Traceback" not in out, out
        assert f"the output folder {read_only}/outputs/" in out
        assert f"{read_only} is read-only" in out
        assert list(read_only.iterdir()) == []

        mount_tmpfs(full, "size=60m")
        try:
            (full / "filler").write_bytes(b"\0" * (50 * 2**20))  # 10 MB left
            monkeypatch.chdir(full)
            code, out = launch(["-m", "eval.limit=1", "cache=frac_10,frac_25"], capfd)
            assert code == 1 and "Traceback" not in out, out
            assert re.search(rf"the output folder {full}/multirun/\S+: only \d+\.\d MB free", out)
            assert sorted(p.name for p in full.iterdir()) == ["filler"]

            # The disk fills up while a run computes: neither the store nor the spool can take
            # its result, which the run says in one line (a relaunch, with room again, closes
            # the run it left RUNNING, as for any driver that is gone, and computes it again).
            (full / "filler").unlink()
            args = [f"sweep.runner={RUNNER}", f"mlflow.experiment={EXP}"]
            driver = start_sweep(args, full, ray=ray_head, FAKE_DIR=str(full), FAKE_SLEEP="1")
            try:
                wait_for(lambda: calls(full, "run "), "the run", [driver])
                with open(full / "filler", "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 2**20)
                out = driver.communicate(timeout=120)[0]
            finally:
                stop_all([driver])
            assert driver.returncode == 1 and "Traceback" not in out, out
            assert f"cannot write the spool {full}/mlflow-spool/" in out
            assert "No space left on device; the result of run [defaults] is lost" in out
        finally:
            subprocess.run(["umount", "--lazy", str(full)])
    finally:
        if os.geteuid():
            read_only.chmod(0o755)
        else:
            subprocess.run(["umount", "--lazy", str(read_only)])


def sqlite_full() -> Exception:
    """What MLflow raises when SQLite cannot grow its file: its own error, wrapping SQLAlchemy's,
    wrapping sqlite3's."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    low = sqlite3.OperationalError("database or disk is full")
    mid = OperationalError("INSERT INTO metrics ...", {}, low)
    mid.__cause__ = low
    err = MlflowException(message=mid)
    err.__cause__ = mid
    return err


class FullStore:
    """An MlflowClient on a full disk: the experiment is there, every write fails."""

    def __init__(self, uri: str):
        self.uri = uri

    def get_experiment_by_name(self, name):
        return SimpleNamespace(experiment_id="1", lifecycle_stage="active")

    def __getattr__(self, name):
        def call(*args, **kwargs):
            raise sqlite_full()

        return call


def test_a_full_disk_under_the_store_is_named_from_the_first_failure_to_the_end(
    tmp_path, monkeypatch, caplog
):
    """In-process: a run finishes while SQLite cannot grow; the driver's warning, the spooled
    record and the final message all say which path has no space left."""
    from hydra import compose, initialize_config_dir

    from sweep import app, jobs, tracking, worker
    from sweep.errors import SweepError
    from sweep.ledger import Ledger

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "MlflowClient", FullStore)
    db = tmp_path / "mlflow.db"
    overrides = [f"mlflow.tracking_uri=sqlite:///{db}", "mlflow.outage_wait_s=0", "seed=3"]
    with initialize_config_dir(app.CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    job = jobs.make_job(0, cfg, ["seed=3"], jobs.load_runner(RUNNER))
    ledger = Ledger(cfg)
    why = f"no space left on {db}; free some space there"
    with caplog.at_level(logging.WARNING, logger="sweep.ledger"):
        record = ledger.claim(job)  # the claim cannot be written: dispatched unclaimed
    assert f"cannot be written ({why})" in caplog.text
    record.metrics = [("accuracy", 0.5, 1, 0)]
    outcome = worker.deliver(ledger.tracker, record, jobs.Outcome("FINISHED", {}))
    assert outcome.store_error == why
    ledger.received(outcome)
    with pytest.raises(SweepError) as err:
        ledger.drain()
    assert f"did not take 1 runs ({why}); their results are safe in {tmp_path}" in str(err.value)
    # The local artifact store on a full disk: the copy's destination is named.
    dest = tmp_path / "mlruns" / "1" / "r" / "artifacts" / "trace.parquet"
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/trace.parquet", None, str(dest))
    assert (
        tracking.store_failure(ledger.tracker.uri, full)
        == f"no space left on {dest}; free some space there"
    )


# A driver that starts a private Ray instance, says so and waits to be killed.
DRIVER = """
import time
from sweep import cluster
from sweep.schema import RayConf
cluster.connect(RayConf())
print("up", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_the_private_ray_instance_of_a_killed_driver_is_ended_by_the_next_launch(tmp_path):
    """kill -9 of a driver ends its Ray servers, not the agents its raylet started: those are
    ended by the next launch, and a process that merely reads the instance's logs is not."""
    import json

    from sweep.cluster import INSTANCES, end_orphans, processes_of
    from sweep.drivers import process_mark

    env = sweep_env()
    env.pop("RAY_ADDRESS", None)
    driver = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
        text=True, start_new_session=True,
    )  # fmt: skip
    viewer = None
    try:
        # Ray may say something first; EOF: the driver ended.
        assert any(line == "up\n" for line in driver.stdout), "the driver did not start Ray"
        session = json.loads((INSTANCES / f"{driver.pid}.json").read_text())["session_dir"]

        def alive() -> list[int]:
            return [pid for pid in processes_of(session) if process_mark(pid) is not None]

        wait_for(lambda: len(alive()) >= 2, "the agents", [driver], timeout_s=60)
        log = next(Path(session, "logs").glob("*.log"))
        viewer = subprocess.Popen(["tail", "-f", str(log)], stdout=subprocess.DEVNULL)
        os.kill(driver.pid, 9)  # the driver alone, as the OOM killer would
        driver.wait(timeout=30)
        assert alive(), "the instance ended with its driver: nothing left to test"
        end_orphans()  # what the next launch does before it starts its own instance
        deadline = time.monotonic() + 10
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert alive() == []
        assert viewer.poll() is None
    finally:
        stop_all([driver])
        if viewer is not None:
            viewer.kill()
            viewer.wait()
