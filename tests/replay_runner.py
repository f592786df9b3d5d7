"""The stand-in runner of conftest_sweep plus the replay API (`sweep.runner=tests.replay_runner`).

Every job is replayable; `record` returns an empty stream and `replay` answers like the stand-in's
`run`. The first replay of a job with cache.frac=0.25 kills its actor process (once, by a marker
file), so an actor dying in the middle of a unit can be provoked.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from slicemoe.models import Dims, Shape
from slicemoe.stream import Stream, stream_key
from tests.conftest_sweep import ConfigError, _log, load, load_key, run, validate

__all__ = ["ConfigError", "load", "load_key", "record", "replay", "replayable", "run"]
__all__ += ["stream_key", "validate"]


def replayable(cfg) -> bool:
    return True


def record(cfg, loaded, progress=None) -> Stream:
    _log(f"record seed={cfg.seed}")
    return Stream(
        key=stream_key(cfg),
        config={},
        shape=Shape(1, 2, 1, 1, 1),
        dims=Dims(1, 1, 1, 1),
        scores={},
        prompt_len=np.zeros(1, np.int32),
        prefill_counts=np.zeros((1, 1, 2), np.int32),
        decode_steps=np.zeros(1, np.int32),
        experts=np.zeros((0, 1, 1), np.int16),
        high=np.zeros((0, 1, 1), bool),
        next_gate=np.zeros((0, 1, 2), np.int16),
        next_gate_critical=np.zeros((0, 1, 1), bool),
    )


def replay(stream: Stream, cfg) -> dict:
    _log(f"replay frac={cfg.cache.frac}")
    marker = Path(os.environ["FAKE_DIR"]) / "replay-died.marker"
    if cfg.cache.frac == 0.25 and not marker.exists():
        marker.touch()
        os._exit(3)
    return run(cfg)
