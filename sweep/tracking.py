"""MLflow bookkeeping: experiment, parent and child runs, results, and the resume lookup.

Everything goes through `MlflowClient` with explicit run ids (no fluent active-run state), so the
driver can hold a parent run open while actors in other processes log to their child runs.
Runs are told apart by tags: `role=sweep` for a parent, `role=run` for a run, `run_key` for the
config identity that resume matches on.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import numbers
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Before mlflow is imported anywhere in this process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Creating or migrating the SQLite store is routine, not news.
for _name in ("mlflow.store.db.utils", "alembic"):
    logging.getLogger(_name).setLevel(logging.WARNING)

from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.entities import Run as MlflowRun  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from sweep.errors import SweepError  # noqa: E402
from sweep.jobs import RESULT_METRICS, Job, Outcome  # noqa: E402

NON_SCALAR = ("curves", "trace_path", "stream_path")
STREAM_ARTIFACT = "requests.npz"
# MLflow's log_batch accepts at most 1000 metrics per call.
BATCH = 1000
HEALTH_TIMEOUT_S = 5.0


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (against the current directory)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def check_reachable(uri: str) -> None:
    """Fail in seconds, not after MLflow's minutes of retries, when the store cannot be used."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=HEALTH_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            return  # the server answered; authentication and the like are MLflow's business
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise SweepError(
                f"mlflow.tracking_uri={uri} is unreachable ({reason}). Start the server "
                "(mlflow server --host 127.0.0.1 --port 5000), fix the address, or log locally "
                "with mlflow.tracking_uri=sqlite:///mlflow.db"
            ) from None
    elif parsed.scheme == "sqlite":
        folder = Path(parsed.path).parent
        if not folder.is_dir():
            raise SweepError(
                f"mlflow.tracking_uri={uri}: the folder {folder} does not exist; create it or "
                "point mlflow.tracking_uri somewhere else"
            )


def git_commit() -> str:
    """Commit of the checkout the sweep code runs from ("unknown" outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


class Tracker:
    """One experiment in one tracking store; usable from the driver and from actors."""

    def __init__(self, uri: str, experiment_id: str):
        self.uri = uri
        self.experiment_id = experiment_id
        self.client = MlflowClient(uri)

    @classmethod
    def open(cls, uri: str, experiment: str, artifact_location: str | None = None) -> Tracker:
        """Check the store, then get or create the experiment (in the driver, before fan-out:
        processes creating a fresh SQLite store at once race on its tables)."""
        uri = resolve_uri(uri)
        check_reachable(uri)
        client = MlflowClient(uri)
        try:
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    exp_id = client.create_experiment(experiment, artifact_location)
                except MlflowException:
                    exp = client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
                    exp_id = exp.experiment_id
            elif exp.lifecycle_stage == "deleted":
                raise SweepError(
                    f"mlflow.experiment={experiment} is deleted in {uri}; restore it "
                    f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or pick "
                    "another name"
                )
            else:
                exp_id = exp.experiment_id
        except MlflowException as err:
            raise SweepError(f"mlflow.tracking_uri={uri}: {err.message}") from None
        return cls(uri, exp_id)

    def search(self, filter_string: str) -> Iterable[MlflowRun]:
        token = None
        while True:
            page = self.client.search_runs(
                [self.experiment_id], filter_string, max_results=5000, page_token=token
            )
            yield from page
            token = page.token
            if not token:
                return

    def finished(self) -> dict[str, MlflowRun]:
        """The FINISHED run of every run key in the experiment."""
        runs = self.search("attributes.status = 'FINISHED' and tags.role = 'run'")
        return {r.data.tags["run_key"]: r for r in runs if "run_key" in r.data.tags}

    def kill_stale(self, keys: set[str]) -> int:
        """Mark runs left RUNNING by a killed driver as KILLED before their keys run again."""
        running = self.search("attributes.status = 'RUNNING' and tags.role = 'run'")
        stale = [r for r in running if r.data.tags.get("run_key") in keys]
        for run in stale:
            self.client.set_terminated(run.info.run_id, "KILLED")
        return len(stale)

    def open_parent(self, sweep_id: str, name: str, commit: str) -> str:
        """The parent run of this sweep: reopened when the same sweep is launched again."""
        for run in self.search(f"tags.role = 'sweep' and tags.sweep_id = '{sweep_id}'"):
            self.client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=name[:250],
            tags={
                "role": "sweep",
                "sweep_id": sweep_id,
                "git_commit": commit,
                "mlflow.source.git.commit": commit,
                "host": socket.gethostname(),
            },
        )
        return run.info.run_id

    def close_parent(self, run_id: str, status: str, counts: dict[str, int], table: str) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id, metrics=[Metric(f"runs_{k}", float(v), now, 0) for k, v in counts.items()]
        )
        self.client.log_text(run_id, table, "results.csv")
        self.client.set_terminated(run_id, status)

    def create_run(self, job: Job, parent_id: str | None, sweep_id: str, commit: str) -> str:
        """A RUNNING run holding the job's params, tags and config.yaml; an actor finishes it."""
        tags = {
            "role": "run",
            "run_key": job.key,
            "load_key": job.load_key,
            "sweep_id": sweep_id,
            "overrides": job.name,
            "git_commit": commit,
            "mlflow.source.git.commit": commit,
        }
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run_id = self.client.create_run(
            self.experiment_id, run_name=job.name[:250], tags=tags
        ).info.run_id
        params = [Param(k, v) for k, v in job.params.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i : i + 100])
        self.client.log_text(run_id, job.config_yaml, "config.yaml")
        return run_id

    def log_result(self, run_id: str, result: dict[str, Any]) -> dict[str, float]:
        """Log the scalar metrics (step 0), the curves (one step per decode step) and the trace;
        returns the scalars."""
        now = int(time.time() * 1000)
        scalars = scalar_metrics(result)
        metrics = [Metric(k, v, now, 0) for k, v in scalars.items()]
        for name, values in (result.get("curves") or {}).items():
            metrics += [Metric(name, _float(v), now, step) for step, v in enumerate(values)]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + BATCH])
        trace = result.get("trace_path")
        if trace and Path(trace).is_file():
            self._log_as(run_id, Path(trace), "trace.parquet")
        stream = result.get("stream_path")
        if stream and Path(stream).is_file():
            self._log_as(run_id, Path(stream), STREAM_ARTIFACT)
        return scalars

    def store_stream(self, run_id: str, path: Path, stream_key: str) -> None:
        """Keep a recorded request stream with the run that recorded it, findable by key."""
        self._log_as(run_id, path, STREAM_ARTIFACT)
        self.client.set_tag(run_id, "stream_key", stream_key)

    def find_stream(self, stream_key: str, folder: Path) -> Path | None:
        """Download a request stream recorded earlier for `stream_key`, if the store has one."""
        for run in self.search(f"tags.stream_key = '{stream_key}'"):
            try:
                return Path(
                    self.client.download_artifacts(run.info.run_id, STREAM_ARTIFACT, str(folder))
                )
            except (MlflowException, OSError):
                continue  # artifact gone or unreadable: try the next, else record again
        return None

    def log_failure(self, run_id: str, error: str, status: str = "FAILED") -> None:
        self.client.set_tag(run_id, "error", last_line(error)[:5000])
        self.client.log_text(run_id, error, "error.txt")
        self.client.set_terminated(run_id, status)

    def _log_as(self, run_id: str, path: Path, name: str) -> None:
        if path.name == name:
            self.client.log_artifact(run_id, str(path))
            return
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copyfile(path, Path(tmp) / name)
            self.client.log_artifact(run_id, str(Path(tmp) / name))


def scalar_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Every numeric entry of a run result (the non-scalar `curves` and `trace_path` drop out)."""
    out = {}
    for key, value in result.items():
        numeric = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if key not in NON_SCALAR and (numeric or value is None):
            out[key] = _float(value)
    return out


def stored_metrics(run: MlflowRun) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k in RESULT_METRICS}


def results_csv(rows: list[tuple[Job, Outcome]]) -> str:
    buf = io.StringIO()
    names = list(RESULT_METRICS)
    writer = csv.writer(buf)
    writer.writerow(["run", "run_key", "status", "run_id", "error", *names])
    for job, out in rows:
        values = [out.metrics.get(n, "") for n in names]
        writer.writerow([job.name, job.key, out.status, out.run_id or "", out.error or "", *values])
    return buf.getvalue()


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else text


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)
