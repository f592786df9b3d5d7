"""What the driver prints: a live progress line while a sweep runs, a result table at the end."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from typing import IO

# Columns of the short result table, in order.
TABLE_METRICS = (
    "accuracy",
    "perplexity",
    "miss_rate_hbn",
    "flash_bytes_per_token",
    "highbit_fraction",
    "energy_decode_j_per_token",
    "latency_decode_s_per_token",
    "wall_s",
)


class Progress:
    """Runs done / total, running, failed, skipped and an ETA.

    On a terminal one line is redrawn in place; otherwise (logs, CI, `ray job logs`) a plain line
    is written whenever a count changes, and at most every `quiet_s` seconds while nothing does.
    """

    def __init__(
        self, total: int, skipped: int, stream: IO[str] | None = None, quiet_s: float = 60
    ):
        self.total = total
        self.skipped = skipped
        self.finished = 0
        self.failed = 0
        self.running = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet_s = quiet_s
        self.started = time.monotonic()
        self._drawn: tuple[int, int, int] | None = None
        self._last_write = 0.0

    def update(self, running: int, finished: int, failed: int) -> None:
        self.running, self.finished, self.failed = running, finished, failed
        self.draw()

    def draw(self, force: bool = False) -> None:
        counts = (self.finished, self.failed, self.running)
        now = time.monotonic()
        interval = 1.0 if self.tty else self.quiet_s
        if not (force or counts != self._drawn or now - self._last_write >= interval):
            return
        line = self.line()
        self.stream.write("\r\033[K" + line if self.tty else line + "\n")
        self.stream.flush()
        self._drawn, self._last_write = counts, now

    def close(self) -> None:
        self.draw()
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        done = self.finished + self.failed + self.skipped
        return (
            f"[sweep] {done}/{self.total} done | {self.running} running | {self.failed} failed"
            f" | {self.skipped} skipped | ETA {self.eta()}"
        )

    def eta(self) -> str:
        computed = self.finished + self.failed
        remaining = self.total - self.skipped - computed
        if remaining <= 0:
            return "0s"
        if computed == 0:
            return "?"
        rate = computed / (time.monotonic() - self.started)
        return format_duration(remaining / rate)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def result_table(rows: Sequence[tuple[str, str, dict[str, float]]], limit: int = 50) -> str:
    """Rows of (run name, status, metrics) as an aligned text table; long sweeps are cut.
    Metrics that no run has (perplexity of a generation task) are left out, and with several
    runs each name keeps only the overrides that differ between them."""
    metrics = [m for m in TABLE_METRICS if any(_has(r[2].get(m)) for r in rows)]
    names = _short([name for name, _, _ in rows])
    header = ["run", "status", *metrics]
    body = [
        [name, status, *(_fmt(values.get(m)) for m in metrics)]
        for name, (_, status, values) in zip(names[:limit], rows[:limit])
    ]
    lines = [aligned([header, *body])]
    if len(rows) > limit:
        lines.append(
            f"... {len(rows) - limit} more runs: see MLflow (results.csv on the parent run)"
        )
    return "\n".join(lines)


def aligned(rows: Sequence[Sequence[object]]) -> str:
    """Rows as text columns, each as wide as its widest cell."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows
    )


def _has(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _short(names: list[str]) -> list[str]:
    """Each run name (its overrides, space-separated) without the overrides every run shares."""
    if len(names) < 2:
        return names
    common = set.intersection(*(set(n.split()) for n in names))
    short = [" ".join(w for w in n.split() if w not in common) for n in names]
    return [s or n for s, n in zip(short, names)]


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4g}"
