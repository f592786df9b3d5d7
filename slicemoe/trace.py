"""The optional per-request trace of a run (`trace=true`), as a parquet file."""

from __future__ import annotations

import os
import time
from pathlib import Path

from slicemoe.config import RunConfig

COLUMNS = ["sequence", "phase", "step", "layer", "expert", "slice", "bytes", "hit"]


def write_trace(cfg: RunConfig, traces: list[list]) -> str:
    import pandas as pd

    rows = [r for t in traces for r in t]
    path = Path(
        cfg.trace_path or f"traces/trace-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.parquet"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_parquet(path, index=False)
    return str(path)
