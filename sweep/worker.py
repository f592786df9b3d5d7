"""The body of one run, shared by the in-process single run and the Ray actors.

A run's own errors never escape: they are logged to its MLflow run (tag `error`, artifact
`error.txt`, status FAILED) and returned as a FAILED outcome, so one bad config cannot stop the
actor or the sweep. Everything a run logs is collected in its RunRecord and written at its end;
when the store cannot take it, the record travels back with the outcome to the driver's spool.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import socket
import sys
import tempfile
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from sweep.jobs import Job, Outcome
from sweep.tracking import (
    STORE_ERRORS,
    STREAM_ARTIFACT,
    Held,
    RunRecord,
    Tracker,
    last_line,
    sha256_of,
)


class ModelCache:
    """Loaded models by load key, least recently used first out."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[str, Any] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        # Make room first: two big models side by side may not fit in memory.
        while len(self._items) >= self.capacity:
            self._items.popitem(last=False)
            _release_memory()
        _no_progress_bars()
        value = load()
        self._items[key] = value
        return value


def _no_progress_bars() -> None:
    """transformers' per-load bars would break the sweep's progress line, once per actor whose
    runner uses transformers (slicemoe.run imports it with itself)."""
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def execute(
    runner: ModuleType,
    models: ModelCache,
    job: Job,
    record: RunRecord,
    tracker: Tracker,
    progress: Callable | None = None,
) -> Outcome:
    """One job with the model in the loop; `progress` goes to the runner's run (sweep.progress
    shows it)."""

    def compute(cfg):
        record.tags["model_load"] = "reused" if job.load_key in models else "fresh"
        loaded = models.get(job.load_key, lambda: runner.load(cfg))
        # After loading: the runner imports torch, which tells which device was used.
        record.tags["device"] = _device(cfg.model.device)
        return runner.run(cfg, loaded, progress)

    return _finish(job, record, tracker, compute)


def execute_group(
    runner: ModuleType,
    models: ModelCache,
    jobs: list[Job],
    records: list[RunRecord],
    tracker: Tracker,
    reuse_streams: bool = True,
    mrc_points: int = 0,
    optimality: bool = True,
    progress: Callable | None = None,
) -> list[Outcome]:
    """Jobs that share one model pass (one stream key, or several packed, sweep.jobs.units_of):
    the pass (none for a stream an earlier sweep stored, with `reuse_streams`; `progress` goes
    to it), then one replay per job, each finished in MLflow as soon as it is done, so a killed
    sweep keeps every replayed run. The first job of each stream keeps it (and its miss-ratio
    curve). Outcomes in the order of `jobs`."""
    with tempfile.TemporaryDirectory(prefix="slicemoe-stream-") as tmp:
        parts = by_stream(jobs, records)
        try:
            streams = _streams(runner, models, parts, tracker, reuse_streams, Path(tmp), progress)
        except Exception:
            return fail_all(records, tracker)
        outcomes = {}
        for (part, part_records), (stream, _) in zip(parts, streams):
            done = replay_all(
                runner, stream, part, part_records, tracker, mrc_points, Path(tmp),
                optimality=optimality,
            )  # fmt: skip
            outcomes.update({job.index: outcome for job, outcome in zip(part, done)})
        return [outcomes[job.index] for job in jobs]


def stream_bytes(
    runner: ModuleType,
    models: ModelCache,
    jobs: list[Job],
    records: list[RunRecord],
    tracker: Tracker,
    reuse_streams: bool = True,
    progress: Callable | None = None,
) -> list:
    """The first half of execute_group, for replays elsewhere (sweep.actors): [the first
    record of each stream key's jobs (tagged as the stream's source, without the file), then
    each stream's requests.npz]; on failure [every job's outcome, then no bytes]."""
    parts = by_stream(jobs, records)
    with tempfile.TemporaryDirectory(prefix="slicemoe-stream-") as tmp:
        try:
            streams = _streams(runner, models, parts, tracker, reuse_streams, Path(tmp), progress)
        except Exception:
            return [fail_all(records, tracker)] + [b""] * len(parts)
        heads = []
        for (_, part_records), _ in zip(parts, streams):
            part_records[0].artifacts.pop(STREAM_ARTIFACT, None)  # replay_bytes puts it back
            heads.append(part_records[0])
        return [heads] + [path.read_bytes() for _, path in streams]


def by_stream(jobs: list[Job], records: list) -> list[tuple[list[Job], list]]:
    """Jobs (and their records) by stream key, in order of first appearance."""
    parts: dict[str | None, tuple[list[Job], list]] = {}
    for job, record in zip(jobs, records):
        part = parts.setdefault(job.stream_key, ([], []))
        part[0].append(job)
        part[1].append(record)
    return list(parts.values())


def replay_bytes(
    runner: ModuleType,
    npz: bytes,
    sha256: str,
    job: Job,
    record: RunRecord,
    tracker: Tracker,
    mrc_points: int = 0,
    optimality: bool = True,
) -> Outcome:
    """The second half of execute_group for one job, from the bytes stream_bytes returned and
    their hash (its first record's tag stream_sha256: hashed once, where it was recorded)."""
    from slicemoe.stream import Stream

    recorded = record.tags.get("stream_source") == "recorded"
    if recorded:
        record.artifacts[STREAM_ARTIFACT] = npz
    with tempfile.TemporaryDirectory(prefix="slicemoe-stream-") as tmp:
        (outcome,) = replay_all(
            runner, Stream.load(npz), [job], [record], tracker, mrc_points, Path(tmp),
            sha256=sha256, optimality=optimality,
        )  # fmt: skip
        return outcome


def fail_all(records: list[RunRecord], tracker: Tracker) -> list[Outcome]:
    error = traceback.format_exc()
    return [
        deliver(tracker, r.fail(error), Outcome("FAILED", {}, error=last_line(error)))
        for r in records
    ]


def replay_all(
    runner: ModuleType,
    stream,
    jobs: list[Job],
    records: list[RunRecord],
    tracker: Tracker,
    mrc_points: int,
    tmp: Path,
    sha256: str | None = None,
    optimality: bool = True,
) -> list[Outcome]:
    """Replay each job from `stream`, with `optimality` beside Belady's oracle; the run that
    recorded it (tag stream_source=recorded) also gets the stream's miss-ratio curve."""
    curve = callable(getattr(runner, "miss_ratio_curve", None)) and mrc_points
    if records[0].tags.get("stream_source") == "recorded" and curve:
        try:
            _miss_ratio_curve(runner, stream, jobs[0].config, records[0], mrc_points, tmp)
        except Exception:  # an extra figure: its failure must not cost the runs
            error = last_line(traceback.format_exc())
            records[0].tags["miss_ratio_curve_error"] = error[:5000]

    analyse = getattr(runner, "optimality", None) if optimality else None
    shared: dict = {}  # what the analyses of runs of this stream share (Belady's replays)

    def replay(cfg, record):
        result = runner.replay(stream, cfg)
        if callable(analyse):
            _optimality(analyse, stream, cfg, result, record, shared)
        return result

    sha256 = sha256 or records[0].tags["stream_sha256"]
    outcomes = []
    for job, record in zip(jobs, records):
        # The stream each run replayed, by content: an audit can tell a run whose stream
        # is gone or changed since.
        record.tags.update(replayed_from=job.stream_key, stream_sha256=sha256)
        outcomes.append(_finish(job, record, tracker, functools.partial(replay, record=record)))
    return outcomes


def _streams(runner, models, parts, tracker: Tracker, reuse: bool, tmp: Path,
             progress: Callable | None):  # fmt: skip
    """The request stream and its file of each part (jobs of one stream key, their records):
    stored by an earlier sweep, else recorded, those of several parts in one packed model pass,
    and kept with the part's first record (artifact requests.npz, tag stream_key)."""
    from slicemoe.stream import Stream

    found: list = []
    for jobs, records in parts:
        found.append(None)
        # A trace is read again each time: its file, not a stored copy, is the source.
        stored = None
        if reuse and not jobs[0].config.stream_file:
            folder = tmp / f"stored{len(found)}"  # each part's download its own
            folder.mkdir()
            stored = tracker.find_stream(jobs[0].stream_key, folder)
        if stored is None:
            continue
        path, digest = stored
        try:
            found[-1] = Stream.load(path), path
        except Exception as err:  # written before streams were hashed, then damaged
            print(
                f"[sweep] the stored request stream {jobs[0].stream_key} cannot be read "
                f"({type(err).__name__}: {err}); recording it again",
                file=sys.stderr,
            )
        else:
            records[0].tags.update(stream_source="stored", stream_sha256=digest)
    todo = [i for i, f in enumerate(found) if f is None]
    if not todo:
        return found
    first = [parts[i][0][0] for i in todo]
    loaded = models.get(first[0].load_key, lambda: runner.load(first[0].config))
    start = time.time()
    if len(todo) == 1:
        recorded = [runner.record(first[0].config, loaded, progress)]
    else:
        recorded = runner.record_packed([job.config for job in first], loaded, progress)
    seconds = time.time() - start
    for i, job, stream in zip(todo, first, recorded):
        record = parts[i][1][0]
        record.tags["device"] = _device(job.config.model.device)
        (tmp / f"recorded{i}").mkdir()
        path = stream.save(tmp / f"recorded{i}" / STREAM_ARTIFACT)
        record.artifacts[STREAM_ARTIFACT] = str(path)
        record.tags.update(
            stream_source="recorded", stream_key=job.stream_key, stream_sha256=sha256_of(path)
        )
        # The model pass is not part of any replayed run's wall_s: it is stated here (a
        # packed pass's whole time, named by its first stream, and the streams it recorded).
        record.tags.update(
            stream_record_s=f"{seconds:.2f}",
            stream_pass=first[0].stream_key,
            stream_packed=str(len(todo)),
        )
        found[i] = stream, path
    return found


def _miss_ratio_curve(runner, stream, cfg, record: RunRecord, points: int, tmp: Path) -> None:
    """Miss rate against cache size (points from 100/points % to 100 % of the routed experts at
    8 bits), as miss_ratio_curve.csv and .png of the run that recorded the stream."""
    import matplotlib

    matplotlib.use("Agg")  # actors have no display
    import matplotlib.pyplot as plt
    import pandas as pd

    from sweep.report.figures import plot_miss_ratio_curve

    fractions = [(i + 1) / points for i in range(points)]
    table = pd.DataFrame(runner.miss_ratio_curve(stream, cfg, fractions))
    if table.empty:  # the stream has none (its requests depend on the cache)
        return
    csv, png = tmp / "miss_ratio_curve.csv", tmp / "miss_ratio_curve.png"
    table.to_csv(csv, index=False)
    fig = plot_miss_ratio_curve(table, title=f"stream {stream.key} ({cfg.cache.eviction})")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    record.artifacts.update({csv.name: str(csv), png.name: str(png)})


def _optimality(analyse, stream, cfg, result: dict, record: RunRecord, shared: dict) -> None:
    """The run beside Belady's oracle (slicemoe.optimality): its scalars join the result, its
    per-layer tables become CSV artifacts."""
    try:
        scalars, tables = analyse(stream, cfg, shared)
    except Exception:  # an analysis: its failure must not cost the run
        record.tags["optimality_error"] = last_line(traceback.format_exc())[:5000]
        return
    result.update(scalars)
    for name, table in tables.items():
        record.artifacts[f"{name}.csv"] = table.to_csv(index=False).encode()


def _finish(job: Job, record: RunRecord, tracker: Tracker, compute: Callable) -> Outcome:
    """compute(cfg) -> the run's result, logged to `record`'s run; any error becomes a FAILED
    run."""
    cfg = job.config
    with tempfile.TemporaryDirectory(prefix="slicemoe-run-") as tmp:
        if cfg.trace and not cfg.trace_path:
            cfg = dataclasses.replace(cfg, trace_path=str(Path(tmp) / "trace.parquet"))
        record.tags["host"] = socket.gethostname()
        try:
            if cfg.stream_file:  # the trace the run replayed, by content (its path is a param)
                from slicemoe.traces import file_sha256

                record.tags["stream_file_sha256"] = file_sha256(cfg.stream_file)
            outcome = Outcome("FINISHED", record.add_result(compute(cfg)))
        except Exception:
            error = traceback.format_exc()
            record.fail(error)
            outcome = Outcome("FAILED", {}, error=last_line(error))
        return deliver(tracker, record, outcome)


def deliver(tracker: Tracker, record: RunRecord, outcome: Outcome) -> Outcome:
    """Write the record to the store; when the store cannot take it, the record goes back with
    the outcome (its files read into memory) for the driver to spool."""
    try:
        outcome.run_id = tracker.push(record)
    except (*STORE_ERRORS, Held) as err:
        outcome.run_id = record.run_id
        outcome.record = record.detached()
        outcome.store_error = tracker.failure(err)
    return outcome


def _device(requested: str) -> str:
    torch = sys.modules.get("torch")
    if requested == "cpu" or torch is None or not torch.cuda.is_available():
        return "cpu"
    index = int(requested.split(":")[1]) if requested.startswith("cuda:") else 0
    return torch.cuda.get_device_name(index)


def _release_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
