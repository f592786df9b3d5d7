"""MLflow bookkeeping: experiment, parent and child runs, results, claims and the resume lookup.

Everything goes through `MlflowClient` with explicit run ids (no fluent active-run state), so the
driver can hold a parent run open while actors in other processes log to their child runs.
Runs are told apart by tags: `role=sweep` for a parent, `role=run` for a run, `run_key` for the
config identity that resume matches on, `driver` for the driver that claimed it.

What a run writes is built up as a `RunRecord` (plain data) and written in one `push` at its
end; a record the store cannot take goes to the driver's spool (sweep.sync) instead of being lost.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import math
import numbers
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# Before mlflow is imported anywhere in this process.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow retries a failing HTTP request for about four minutes by default; the spool takes over
# sooner (a few seconds), so that an actor keeps computing while the server is away.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
# The result table says where the runs are: no link per run on stdout.
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# An actor fetching a stored request stream: a "Downloading artifacts" bar would reach the
# driver's console through Ray, between the sweep's own lines or after its table.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Creating or migrating the SQLite store is routine, not news; nor is each retry of a request
# to a server that is away, or a database error with its traceback (the error reaches the
# sweep, which says it once).
for _name, _level in (
    ("mlflow.store.db.utils", logging.CRITICAL),
    ("alembic", logging.WARNING),
    ("urllib3.connectionpool", logging.ERROR),
):
    logging.getLogger(_name).setLevel(_level)

from mlflow.entities import Metric, Param, RunTag  # noqa: E402
from mlflow.entities import Run as MlflowRun  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from sqlalchemy.exc import SQLAlchemyError  # noqa: E402

from sweep.drivers import is_alive  # noqa: E402
from sweep.errors import SweepError  # noqa: E402
from sweep.jobs import RESULT_METRICS, Job, Outcome  # noqa: E402

NON_SCALAR = ("curves", "problems", "trace_path", "stream_path")
STREAM_ARTIFACT = "requests.npz"
# A generation run's correctness per problem: {"correct": [0/1 in problem order], "task", "limit"}.
PROBLEMS_ARTIFACT = "problems.json"
# MLflow's log_batch accepts at most 1000 metrics per call.
BATCH = 1000
HEALTH_TIMEOUT_S = 5.0
# What a store that is away raises: MLflow's own errors (HTTP, database) and OS errors (local
# artifact store, a full disk).
STORE_ERRORS = (MlflowException, OSError)
# A parent run proposed by a driver that died before keeping it no longer blocks the sweep.
CANDIDATE_TTL_S = 60


def resolve_uri(uri: str) -> str:
    """Make a relative sqlite path absolute (against the current directory)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + os.path.abspath(uri[len(prefix) :])
    return uri


def sqlite_path(uri: str) -> Path | None:
    """The database file of an SQLite URI (sqlite:///REL or sqlite:////ABS); None otherwise."""
    parsed = urlparse(uri)
    path = parsed.path.removeprefix("/")
    return Path(path) if parsed.scheme == "sqlite" and path else None


def store_failure(uri: str, err: BaseException) -> str:
    """Why the store at `uri` failed, in one line. A full disk (SQLite's "database or disk is
    full", ENOSPC) names the path, a damaged SQLite file how to recover; anything else is the
    error's last line. MLflow wraps SQLAlchemy's error, which wraps sqlite3's: the chain is read
    whole."""
    chain, seen = [], err
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    text = " ".join(str(e) for e in chain)
    db = sqlite_path(uri)
    if db is not None and ("file is not a database" in text or "disk image is malformed" in text):
        return (
            f"{db} is damaged ({'not a database' if 'not a database' in text else 'malformed'}); "
            f"move it aside (mv {db} {db}.damaged) and launch again: a fresh store is made, the "
            "results waiting in the spool are pushed to it and the runs kept only in the old "
            f"file are computed again (sqlite3 {db}.damaged .recover may salvage them)"
        )
    no_space = [e for e in chain if isinstance(e, OSError) and e.errno == errno.ENOSPC]
    if no_space or "database or disk is full" in text:
        # A failed copy names its source, then its destination: the latter is what is full.
        named = [no_space[0].filename2, no_space[0].filename] if no_space else []
        where = next((n for n in named if n), None) or db or uri
        return f"no space left on {where}; free some space there"
    return last_line(str(err))


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


@dataclass
class RunRecord:
    """What one run writes to MLflow, as plain data (shipped between processes, spooled as JSON).

    `create_tags`, `params` and `config_yaml` make the run when it is claimed (or, when the store
    was away at dispatch, when the record is pushed); the rest is written by `Tracker.push`.
    """

    key: str  # run key; "" for a sweep's parent run
    name: str
    run_id: str | None = None
    status: str = "FINISHED"
    create_tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    config_yaml: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    # (name, value, timestamp in ms, step)
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    # name -> a local file's path, or its contents
    artifacts: dict[str, str | bytes] = field(default_factory=dict)
    # A FINISHED run of the key is its result (sweep.resume); False: computed again.
    resume: bool = True

    def add_result(self, result: dict[str, Any]) -> dict[str, float]:
        """The run's metrics (scalars at step 0, curves one step per decode step), its
        correctness per problem, and its trace and request stream files; returns the scalars."""
        now = int(time.time() * 1000)
        scalars = scalar_metrics(result)
        self.metrics += [(k, v, now, 0) for k, v in scalars.items()]
        for name, values in (result.get("curves") or {}).items():
            self.metrics += [(name, _float(v), now, step) for step, v in enumerate(values)]
        if result.get("problems"):
            self.artifacts[PROBLEMS_ARTIFACT] = json.dumps(result["problems"]).encode()
        for key, name in (("trace_path", "trace.parquet"), ("stream_path", STREAM_ARTIFACT)):
            if result.get(key) and Path(result[key]).is_file():
                self.artifacts[name] = str(result[key])
        return scalars

    def fail(self, error: str, status: str = "FAILED") -> RunRecord:
        self.status = status
        self.tags["error"] = last_line(error)[:5000]
        self.artifacts["error.txt"] = error.encode()
        return self

    def detached(self) -> RunRecord:
        """The same record with every artifact read into memory, to outlive its files."""
        self.artifacts = {
            name: item if isinstance(item, bytes) else Path(item).read_bytes()
            for name, item in self.artifacts.items()
        }
        return self


def new_record(
    job: Job,
    parent_id: str | None,
    sweep_id: str,
    commit: str,
    driver: dict[str, str],
    resume: bool = True,
) -> RunRecord:
    """The record of a job about to be dispatched by the driver with tags `driver`."""
    tags = {
        "role": "run",
        "run_key": job.key,
        "load_key": job.load_key,
        "sweep_id": sweep_id,
        "overrides": job.name,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        **driver,
    }
    if parent_id:
        tags["mlflow.parentRunId"] = parent_id
    return RunRecord(
        job.key, job.name, create_tags=tags, params=dict(job.params), config_yaml=job.config_yaml,
        resume=resume,
    )  # fmt: skip


@dataclass
class Claim:
    """Who has a run key: this driver (`run_id`), nobody yet, a finished run or a live driver."""

    run_id: str | None = None
    finished: MlflowRun | None = None
    holder: MlflowRun | None = None


class Held(Exception):
    """A record without a run met a live claim on its key; it waits in the spool."""


class Tracker:
    """One experiment in one tracking store; usable from the driver and from actors."""

    def __init__(self, uri: str, experiment_id: str):
        self.uri = uri
        self.experiment_id = experiment_id
        self.client = MlflowClient(uri)

    @classmethod
    def open(
        cls,
        uri: str,
        experiment: str,
        artifact_location: str | None = None,
        create: bool = True,
    ) -> Tracker:
        """Check the store, then get or create the experiment (in the driver, before fan-out).
        Without `create`, a store or experiment that is not there is an error (to read one)."""
        uri = resolve_uri(uri)
        check_reachable(uri)
        db = sqlite_path(uri)
        if not create and db is not None and not db.is_file():
            raise SweepError(f"mlflow.tracking_uri={uri}: there is no database {db}")
        try:
            with _creating(uri):
                client = MlflowClient(uri)  # creates an SQLite store's tables
                exp = client.get_experiment_by_name(experiment)
                if exp is None and not create:
                    raise SweepError(f"mlflow.tracking_uri={uri} has no experiment {experiment!r}")
                if exp is None:
                    try:
                        exp_id = client.create_experiment(experiment, artifact_location)
                    except MlflowException:  # another driver created it a moment ago
                        exp = client.get_experiment_by_name(experiment)
                        if exp is None:
                            raise
                        exp_id = exp.experiment_id
                elif exp.lifecycle_stage == "deleted":
                    raise SweepError(
                        f"mlflow.experiment={experiment} is deleted in {uri}; restore it "
                        f"(mlflow experiments restore --experiment-id {exp.experiment_id}) or "
                        "pick another name"
                    )
                else:
                    exp_id = exp.experiment_id
        except (MlflowException, SQLAlchemyError) as err:
            raise SweepError(f"mlflow.tracking_uri={uri}: {store_failure(uri, err)}") from None
        return cls(uri, exp_id)

    def failure(self, err: BaseException) -> str:
        return store_failure(self.uri, err)

    def answers(self) -> bool:
        """Whether the store answers now, asked once (no retries)."""
        try:
            if urlparse(self.uri).scheme in ("http", "https"):
                check_reachable(self.uri)
            else:
                self.client.get_experiment(self.experiment_id)
        except (SweepError, *STORE_ERRORS):
            return False
        return True

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

    def start(self, record: RunRecord) -> str:
        """Create `record`'s run (RUNNING) with its params and config.yaml."""
        tags = {**record.create_tags, "heartbeat": f"{time.time():.0f}"}
        run_id = self.client.create_run(
            self.experiment_id, run_name=record.name[:250], tags=tags
        ).info.run_id
        params = [Param(k, v) for k, v in record.params.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(run_id, params=params[i : i + 100])
        self.client.log_text(run_id, record.config_yaml, "config.yaml")
        return run_id

    def claim(self, record: RunRecord) -> Claim:
        """Claim `record`'s run key for its driver: its run is created, then withdrawn (deleted)
        again if the key turns out to be finished or held by a live driver. Two drivers claiming
        at once each see the other's run and both withdraw (and retry later); one that sees no
        other keeps the key, since whoever came second sees it."""
        run_id = self.start(record)
        driver = record.create_tags.get("driver")
        state = self.key_state(record.key, mine=run_id, driver=driver, resume=record.resume)
        if state.finished is not None or state.holder is not None:
            self.client.delete_run(run_id)
            return state
        record.run_id = run_id
        return Claim(run_id=run_id)

    def key_state(
        self, key: str, mine: str | None = None, driver: str | None = None, resume: bool = True
    ) -> Claim:
        """Who has `key` (a FINISHED run counts with `resume` only). RUNNING runs of a dead
        driver, or left by this `driver` before a retry, are closed (KILLED) on the way: only a
        live driver's claim is ever left alone."""
        holder = None
        for run in self.search(f"tags.run_key = '{key}' and tags.role = 'run'"):
            if run.info.run_id == mine:
                continue
            if run.info.status == "FINISHED" and resume:
                return Claim(finished=run)
            if run.info.status != "RUNNING":
                continue
            tags = run.data.tags
            if tags.get("driver") != driver and is_alive(tags):
                holder = run
            else:
                self.client.set_terminated(run.info.run_id, "KILLED")
        return Claim(holder=holder)

    def push(self, record: RunRecord) -> str:
        """Write all of `record` and close its run; returns the run id. A record without a run
        claims one first; pushing again after a partial failure is harmless (identical metrics
        are dropped by MLflow, tags, params and artifacts overwritten with the same values)."""
        if record.run_id is not None and record.key:
            status = self.client.get_run(record.run_id).info.status
            if status != "RUNNING":
                if record.status != "FINISHED" or status == "FINISHED":
                    return record.run_id  # closed already: by an earlier push, or elsewhere
                # Closed by another driver that took this one for gone (a suspended machine):
                # claimed anew, so that the key never has two FINISHED runs.
                record.run_id = None
        if record.run_id is None:
            state = self.claim(record)
            if state.finished is not None:
                # Computed twice while the store was away: the stored run stays the result.
                return state.finished.info.run_id
            if state.holder is not None:
                raise Held(f"run key {record.key} is being computed by another live driver")
        run_id = record.run_id
        for name, item in record.artifacts.items():
            self._log_as(run_id, item, name)
        if record.tags:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in record.tags.items()])
        metrics = [Metric(*m) for m in record.metrics]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(run_id, metrics=metrics[i : i + BATCH])
        self.client.set_terminated(run_id, record.status)
        return run_id

    def open_parent(self, sweep_id: str, name: str, commit: str) -> str:
        """The parent run of this sweep: reopened when the same sweep is launched again. The
        first drivers of a sweep each propose a run (`role=sweep-candidate`); one that finds no
        other keeps it (`role=sweep`), the others withdraw theirs and adopt it."""
        for _ in range(100):
            parents = list(self.search(f"tags.role = 'sweep' and tags.sweep_id = '{sweep_id}'"))
            if parents:
                run_id = min(parents, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            mine = self.client.create_run(
                self.experiment_id,
                run_name=name[:250],
                tags={
                    "role": "sweep-candidate",
                    "sweep_id": sweep_id,
                    "git_commit": commit,
                    "mlflow.source.git.commit": commit,
                    "host": socket.gethostname(),
                },
            ).info.run_id
            rivals = self._parent_rivals(sweep_id, mine)
            if not rivals:
                self.client.set_tag(mine, "role", "sweep")
                return mine
            self.client.delete_run(mine)
            time.sleep(random.uniform(0.1, 1.0))
        raise SweepError(f"could not open the parent run of sweep {sweep_id} in {self.uri}")

    def _parent_rivals(self, sweep_id: str, mine: str) -> list[MlflowRun]:
        rivals = []
        for role in ("sweep", "sweep-candidate"):
            for run in self.search(f"tags.role = '{role}' and tags.sweep_id = '{sweep_id}'"):
                age_s = time.time() - run.info.start_time / 1000
                if run.info.run_id == mine:
                    continue
                if role == "sweep-candidate" and age_s > CANDIDATE_TTL_S:
                    self.client.delete_run(run.info.run_id)  # its driver died proposing it
                else:
                    rivals.append(run)
        return rivals

    def timings(self) -> dict[tuple[str, str, str], tuple[float, float]]:
        """Seconds a model pass and a replay took, by (model, task, documents), the medians of
        the experiment's finished runs: the sweep's plan estimates its time from them."""
        passes: dict[tuple, dict[str, float]] = {}  # by the pass's name: packed ones once
        replays: dict[tuple, list[float]] = {}
        for run in self.search("attributes.status = 'FINISHED' and tags.role = 'run'"):
            p, tags = run.data.params, run.data.tags
            key = (p.get("model.name"), p.get("eval.task"), p.get("eval.limit"))  # timing_key
            if "stream_record_s" in tags:
                name = tags.get("stream_pass", run.info.run_id)
                passes.setdefault(key, {})[name] = float(tags["stream_record_s"])
            elif "replayed_from" not in tags and "wall_s" in run.data.metrics:  # in the loop
                passes.setdefault(key, {})[run.info.run_id] = run.data.metrics["wall_s"]
            if "replayed_from" in tags and "wall_s" in run.data.metrics:
                replays.setdefault(key, []).append(run.data.metrics["wall_s"])
        return {
            k: (statistics.median(v.values()), statistics.median(replays.get(k, [0.0])))
            for k, v in passes.items()
        }

    def stored_streams(
        self, stream_key: str, folder: Path
    ) -> Iterator[tuple[MlflowRun, Path | None]]:
        """Each run that recorded `stream_key`, with its stream downloaded to `folder` (None: its
        artifact is gone or unreadable); each download replaces the one before."""
        for run in list(self.search(f"tags.stream_key = '{stream_key}'")):
            try:
                path = self.client.download_artifacts(run.info.run_id, STREAM_ARTIFACT, str(folder))
            except (MlflowException, OSError):
                path = None
            yield run, None if path is None else Path(path)

    def find_stream(self, stream_key: str, folder: Path) -> tuple[Path, str] | None:
        """Download a request stream recorded earlier for `stream_key`, if the store has one (and
        can be reached: otherwise the stream is recorded again): its path and content hash. A
        stream whose bytes are not those its recording run hashed is never returned."""
        try:
            for run, path in self.stored_streams(stream_key, folder):
                if path is None:
                    continue  # artifact gone or unreadable: try the next, else record again
                digest, want = sha256_of(path), run.data.tags.get("stream_sha256")
                if want and digest != want:
                    print(
                        f"[sweep] the stored request stream {stream_key} of run "
                        f"{run.info.run_id} changed since it was recorded (content hash); it is "
                        "not replayed",
                        file=sys.stderr,
                    )
                    continue
                return path, digest
        except STORE_ERRORS:
            pass
        return None

    def _log_as(self, run_id: str, item: str | bytes, name: str) -> None:
        if isinstance(item, str) and Path(item).name == name:
            self.client.log_artifact(run_id, item)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            if isinstance(item, bytes):
                path.write_bytes(item)
            else:
                shutil.copyfile(item, path)
            self.client.log_artifact(run_id, str(path))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parent_record(run_id: str, status: str, counts: dict[str, int], table: str) -> RunRecord:
    """The sweep's parent run closed: its counts and results.csv."""
    now = int(time.time() * 1000)
    metrics = [(f"runs_{k}", float(v), now, 0) for k, v in counts.items()]
    return RunRecord(
        "", "parent", run_id, status, metrics=metrics, artifacts={"results.csv": table.encode()}
    )


@contextmanager
def _creating(uri: str) -> Iterator[None]:
    """Drivers creating a fresh SQLite store at once race in MLflow's schema migrations: under a
    lock on the database's folder one creates it, the others wait, then find it made."""
    parsed = urlparse(uri)
    if parsed.scheme != "sqlite":
        yield
        return
    folder = os.open(Path(parsed.path).parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        yield
    finally:
        os.close(folder)  # releases the lock


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
