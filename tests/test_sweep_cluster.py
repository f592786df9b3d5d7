"""The cluster path: a Ray head with token authentication on, a sweep sent with `ray job submit`
exactly as docs/cluster.md shows it, results checked in MLflow. The head declares a GPU (a
custom resource count on this CPU machine), so the plan is a GPU box's: an actor per GPU for
the model passes (here one, packed with two streams), their replays as tasks on the CPU left
over."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest_sweep import QUICK, REPO, empty_store, search, stop_ray_head

from sweep.jobs import RESULT_METRICS

RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sweep_submitted_as_a_ray_job_with_token_auth():
    # Short path: Ray's unix sockets live under the temp dir and have a length limit.
    temp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    gcs, dashboard, agent = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    url = f"http://127.0.0.1:{dashboard}"
    try:
        start = subprocess.run(
            [
                RAY,
                "start",
                "--head",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--dashboard-agent-listen-port={agent}",
                f"--temp-dir={temp}/ray",
                "--num-cpus=2",
                "--num-gpus=1",
                "--disable-usage-stats",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert start.returncode == 0, start.stderr[-3000:]

        # Authentication is really on: a client with another token is turned away (the jobs
        # API the CLI calls, asked directly: no second Ray client to start).
        stranger = urllib.request.Request(
            f"{url}/api/jobs/", headers={"Authorization": f"Bearer {secrets.token_hex(16)}"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(stranger, timeout=60)
        assert refused.value.code == 403 and "token" in refused.value.read().decode().lower()

        db = empty_store(temp)
        job = subprocess.run(
            [
                RAY,
                "job",
                "submit",
                "--address",
                url,
                "--working-dir",
                str(REPO),
                "--",
                sys.executable,
                "-m",
                "sweep",
                "-m",
                # Two streams (precision changes the pass) packed into one model pass, each
                # replayed at two cache sizes.
                "policy=dbsc,lru_highbit",
                "cache=frac_10,frac_25",
                *QUICK,
                "sweep.pack_rows=6",
                f"mlflow.tracking_uri={db}",
                "mlflow.experiment=cluster",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=500,
        )
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert "succeeded" in out
        assert "Ray local:" not in out  # the driver joined the job's cluster (RAY_ADDRESS)
        assert "1 actors x (1 CPU, 1 GPU); replays as one-CPU tasks" in out

        (parent,) = search(db, "cluster", "tags.role = 'sweep'")
        children = search(db, "cluster", "tags.role = 'run'")
        assert len(children) == 4
        assert len({run.data.tags["replayed_from"] for run in children}) == 2
        recorders = [r.data.tags for r in children if "stream_pass" in r.data.tags]
        assert len(recorders) == 2 and {t["stream_packed"] for t in recorders} == {"2"}
        assert len({t["stream_pass"] for t in recorders}) == 1
        for run in children:
            assert run.info.status == "FINISHED"
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            assert set(RESULT_METRICS) <= set(run.data.metrics)
    finally:
        # Nothing of it needs to end cleanly; on SIGTERM it takes more than 10 s.
        stop_ray_head(temp / "ray", gcs, grace_s=1)
        shutil.rmtree(temp, ignore_errors=True)
