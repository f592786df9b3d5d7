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
        value = load()
        self._items[key] = value
        return value


def execute(
    runner: ModuleType, models: ModelCache, job: Job, run_id: str, tracker: Tracker
) -> Outcome:
    cfg = job.config
    with tempfile.TemporaryDirectory(prefix="slicemoe-run-") as tmp:
        if cfg.trace and not cfg.trace_path:
            cfg = dataclasses.replace(cfg, trace_path=str(Path(tmp) / "trace.parquet"))
        try:
            reused = job.load_key in models
            tracker.client.set_tag(run_id, "host", socket.gethostname())
            tracker.client.set_tag(run_id, "model_load", "reused" if reused else "fresh")
            loaded = models.get(job.load_key, lambda: runner.load(cfg))
            # After loading: the runner imports torch, which tells which device was used.
            tracker.client.set_tag(run_id, "device", _device(cfg.model.device))
            result = runner.run(cfg, loaded)
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
