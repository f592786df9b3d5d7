"""The body of one run, shared by the in-process single run and the Ray actors.

A run's own errors never escape: they are logged to its MLflow run (tag `error`, artifact
`error.txt`, status FAILED) and returned as a FAILED outcome, so one bad config cannot stop the
actor or the sweep.
"""

from __future__ import annotations

import dataclasses
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
from sweep.tracking import Tracker, last_line


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
    """transformers' per-load bars would break the sweep's progress line, once per actor."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def execute(
    runner: ModuleType, models: ModelCache, job: Job, run_id: str, tracker: Tracker
) -> Outcome:
    """One job with the model in the loop."""

    def compute(cfg):
        reused = job.load_key in models
        tracker.client.set_tag(run_id, "model_load", "reused" if reused else "fresh")
        loaded = models.get(job.load_key, lambda: runner.load(cfg))
        # After loading: the runner imports torch, which tells which device was used.
        tracker.client.set_tag(run_id, "device", _device(cfg.model.device))
        return runner.run(cfg, loaded)

    return _finish(job, run_id, tracker, compute)


def execute_group(
    runner: ModuleType,
    models: ModelCache,
    jobs: list[Job],
    run_ids: list[str],
    tracker: Tracker,
    reuse_streams: bool = True,
    mrc_points: int = 0,
) -> list[Outcome]:
    """Jobs that share one request stream: one model pass (none when an earlier sweep stored
    the stream and `reuse_streams`), then one replay per job, each finished in MLflow as soon as
    it is done, so a killed sweep keeps every replayed run."""
    key = jobs[0].stream_key
    try:
        stream, recorded = _stream(runner, models, jobs[0], run_ids[0], tracker, reuse_streams)
    except Exception:
        error = traceback.format_exc()
        for run_id in run_ids:
            tracker.log_failure(run_id, error)
        return [Outcome("FAILED", {}, run_id=r, error=last_line(error)) for r in run_ids]

    if recorded and mrc_points and callable(getattr(runner, "miss_ratio_curve", None)):
        try:
            _log_miss_ratio_curve(runner, stream, jobs[0].config, run_ids[0], tracker, mrc_points)
        except Exception:  # an extra figure: its failure must not cost the runs
            error = last_line(traceback.format_exc())
            tracker.client.set_tag(run_ids[0], "miss_ratio_curve_error", error[:5000])

    def replay(cfg):
        return runner.replay(stream, cfg)

    outcomes = []
    for job, run_id in zip(jobs, run_ids):
        tracker.client.set_tag(run_id, "replayed_from", key)
        outcomes.append(_finish(job, run_id, tracker, replay))
    return outcomes


def _stream(runner, models, job: Job, run_id: str, tracker: Tracker, reuse: bool):
    """The request stream of `job`'s stream key: stored by an earlier sweep, else recorded by a
    model pass and stored as the artifact requests.npz of `run_id`."""
    from slicemoe.stream import Stream

    with tempfile.TemporaryDirectory(prefix="slicemoe-stream-") as tmp:
        found = tracker.find_stream(job.stream_key, Path(tmp)) if reuse else None
        if found is not None:
            tracker.client.set_tag(run_id, "stream_source", "stored")
            return Stream.load(found), False
        loaded = models.get(job.load_key, lambda: runner.load(job.config))
        tracker.client.set_tag(run_id, "device", _device(job.config.model.device))
        start = time.time()
        stream = runner.record(job.config, loaded)
        tracker.store_stream(run_id, stream.save(Path(tmp) / "requests.npz"), job.stream_key)
        tracker.client.set_tag(run_id, "stream_source", "recorded")
        # The model pass is not part of any replayed run's wall_s: it is stated here.
        tracker.client.set_tag(run_id, "stream_record_s", f"{time.time() - start:.2f}")
        return stream, True


def _log_miss_ratio_curve(runner, stream, cfg, run_id: str, tracker: Tracker, points: int):
    """Miss rate against cache size (points from 100/points % to 100 % of the routed experts at
    8 bits), as miss_ratio_curve.csv and .png of the run that recorded the stream."""
    import matplotlib

    matplotlib.use("Agg")  # actors have no display
    import matplotlib.pyplot as plt
    import pandas as pd

    from sweep.report import plot_miss_ratio_curve

    fractions = [(i + 1) / points for i in range(points)]
    table = pd.DataFrame(runner.miss_ratio_curve(stream, cfg, fractions))
    with tempfile.TemporaryDirectory() as tmp:
        csv, png = Path(tmp) / "miss_ratio_curve.csv", Path(tmp) / "miss_ratio_curve.png"
        table.to_csv(csv, index=False)
        fig = plot_miss_ratio_curve(table, title=f"stream {stream.key} ({cfg.cache.eviction})")
        fig.savefig(png, dpi=110)
        plt.close(fig)
        tracker.client.log_artifact(run_id, str(csv))
        tracker.client.log_artifact(run_id, str(png))


def _finish(job: Job, run_id: str, tracker: Tracker, compute: Callable) -> Outcome:
    """compute(cfg) -> the run's result, logged to `run_id`; any error becomes a FAILED run."""
    cfg = job.config
    with tempfile.TemporaryDirectory(prefix="slicemoe-run-") as tmp:
        if cfg.trace and not cfg.trace_path:
            cfg = dataclasses.replace(cfg, trace_path=str(Path(tmp) / "trace.parquet"))
        try:
            tracker.client.set_tag(run_id, "host", socket.gethostname())
            result = compute(cfg)
            metrics = tracker.log_result(run_id, result)
            tracker.client.set_terminated(run_id, "FINISHED")
            return Outcome("FINISHED", metrics, run_id=run_id)
        except Exception:
            error = traceback.format_exc()
            tracker.log_failure(run_id, error)
            return Outcome("FAILED", {}, run_id=run_id, error=last_line(error))


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
