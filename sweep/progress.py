"""What the driver prints: a progress bar per run in flight and a line for the whole sweep while
it runs, a result table at the end.

A run's bar is tqdm's: on a terminal a live bar, in logs (CI, `ray job logs`) a plain line when
the run starts, every `quiet_s` seconds and when it ends. A run on a Ray actor keeps its progress
on the actor, which the driver reads between its calls (sweep.actors.RunActor.passes): Ray's
`tqdm_ray` draws a worker's bars on the driver too, but only in tqdm's redrawn form (no log
lines), with no tokens/s, and where the driver cannot read them for the sweep's ETA.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from tqdm import tqdm

# Columns of the short result table, in order, with their units.
TABLE_COLUMNS = {
    "accuracy": "accuracy",
    "perplexity": "perplexity",
    "miss_rate_hbn": "miss_rate_hbn",
    "flash_bytes_per_token": "flash_bytes_per_token [B]",
    "highbit_fraction": "highbit_fraction",
    "energy_decode_j_per_token": "energy [J/token]",
    "latency_decode_s_per_token": "latency [s/token]",
    "wall_s": "wall [s]",
}


class LogBar(tqdm):
    """tqdm for logs: each refresh a line of its own instead of a redraw in place."""

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing its line at close: a log has nothing to clear
            return False
        self.fp.write(f"{self if msg is None else msg}\n")
        self.fp.flush()
        return True


class RunBar:
    """One run's model pass: sequences done / total, decode tokens/s and an ETA; called as
    slicemoe.run's `progress(done, total, tokens)`. The bar starts with the first call, so its
    clock leaves out loading the model."""

    def __init__(
        self,
        desc: str,
        stream: IO[str] | None = None,
        quiet_s: float = 60,
        position: int | None = None,
        leave: bool = True,
    ):
        self.desc, self.position, self.leave, self.quiet_s = desc, position, leave, quiet_s
        self.stream = stream or sys.stderr
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int, tokens: int) -> None:
        if self.bar is None:
            tty = self.stream.isatty()
            # miniters=0: redrawn every `mininterval` while tokens move and no sequence ends;
            # smoothing=0: rate and ETA from the whole pass, as sequences end batch by batch.
            self.bar = (tqdm if tty else LogBar)(
                total=total, desc=self.desc, unit="seq", file=self.stream, miniters=0,
                smoothing=0, mininterval=0.5 if tty else self.quiet_s, position=self.position,
                dynamic_ncols=tty, leave=self.leave and tty, postfix="? tok/s",
            )  # fmt: skip
        bar = self.bar
        if done == bar.n >= bar.total:  # ended: the bar stays as it ended
            return
        bar.total = total
        elapsed = bar.format_dict["elapsed"]
        if tokens and elapsed:
            rate = tqdm.format_sizeof(tokens / elapsed)
            bar.set_postfix_str(f"{rate} tok/s", refresh=False)
        bar.update(done - bar.n)
        if done >= total:
            self._last_line()

    def _last_line(self) -> None:
        """In a log, the state the bar ends in gets a line, once."""
        bar = self.bar
        if isinstance(bar, LogBar) and bar.last_print_n != bar.n:
            bar.refresh()
            bar.last_print_n = bar.n

    def close(self) -> None:
        if self.bar is not None:
            self._last_line()
            self.bar.close()


def teller(sink: dict, key: int, runs: int) -> Callable[[int, int, int], None]:
    """A `progress(done, total, tokens)` for a pass on an actor: its state, (runs it serves, done,
    total, tokens), kept in `sink` under `key` (its first job's index) for the driver to read."""

    def tell(done: int, total: int, tokens: int) -> None:
        sink[key] = (runs, done, total, tokens)

    return tell


class Progress:
    """Runs done / total, running, failed, skipped and an ETA, and a bar per model pass in flight.

    The ETA counts the passes in flight by the share of their sequences done. On a terminal the
    sweep's line is redrawn in place, the passes' bars below it; otherwise (logs, CI, `ray job
    logs`) a plain line is written whenever a count changes, and at most every `quiet_s` seconds
    while nothing does.
    """

    def __init__(
        self,
        total: int,
        skipped: int,
        stream: IO[str] | None = None,
        quiet_s: float = 60,
        names: Mapping[int, str] | None = None,
    ):
        self.total = total
        self.skipped = skipped
        self.finished = 0
        self.failed = 0
        self.running = 0
        self.partial = 0.0  # runs' worth of work done in the passes in flight
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.quiet_s = quiet_s
        self.names = names or {}
        self.bars: dict[int, RunBar] = {}
        self.started = time.monotonic()
        self._drawn: tuple[int, int, int] | None = None
        self._last_write = 0.0

    def update(
        self,
        running: int,
        finished: int,
        failed: int,
        passes: Mapping[int, tuple[int, int, int, int]] | None = None,
    ) -> None:
        """The counts, and the passes in flight: key -> (runs it serves, sequences done, of
        total, tokens decoded)."""
        passes = passes or {}
        self.running, self.finished, self.failed = running, finished, failed
        self.partial = sum(runs * done / total for runs, done, total, _ in passes.values() if total)
        self.draw()
        for key in [k for k in self.bars if k not in passes]:
            self.bars.pop(key).close()
        for key, (runs, done, total, tokens) in passes.items():
            if key not in self.bars:
                name = self.names.get(key, f"job {key}")
                more = f" +{runs - 1} replayed" if runs > 1 else ""
                taken = {b.position for b in self.bars.values()}
                slot = next(i for i in range(1, len(self.bars) + 2) if i not in taken)
                self.bars[key] = RunBar(f"[run] {name}{more}", self.stream, self.quiet_s,
                                        position=slot, leave=False)  # fmt: skip
            self.bars[key](done, total, tokens)

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
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()
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
        computed = self.finished + self.failed + self.partial
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
    """Rows of (run name, status, metrics) as an aligned text table, units in the header; long
    sweeps are cut.
    Metrics that no run has (perplexity of a generation task) are left out, and with several
    runs each name keeps only the overrides that differ between them."""
    metrics = [m for m in TABLE_COLUMNS if any(_has(r[2].get(m)) for r in rows)]
    names = short_names([name for name, _, _ in rows])
    header = ["run", "status", *(TABLE_COLUMNS[m] for m in metrics)]
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


def short_names(names: list[str]) -> list[str]:
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
