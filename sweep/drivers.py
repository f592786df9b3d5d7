"""Which driver holds a run, and whether that driver still runs.

A driver claims a run key by creating the run's MLflow run (RUNNING) tagged with its identity
(sweep.tracking.Tracker.claim). Another driver that finds such a claim must tell a live driver,
whose run it must leave alone, from a dead one, whose claim it may take over:
- on the same machine, by the claiming process itself: its pid still exists with the same start
  time (a pid is reused after a while, its start time is not);
- on another machine, by its heartbeat: a live driver refreshes the `heartbeat` tag of its claims
  every HEARTBEAT_S seconds, and one silent for STALE_S is taken to be gone.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

HEARTBEAT_S = 15.0
# Eight missed heartbeats; also the tolerated clock skew between machines.
STALE_S = 120.0


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def host_id() -> str:
    """This machine and process namespace: a hostname can repeat across machines or containers,
    the boot id and pid namespace do not."""
    try:
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pid_ns = ""
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id')}/{pid_ns}"


def process_mark(pid: int) -> str | None:
    """A stamp of the process `pid` that changes when the pid is reused (its start time in clock
    ticks since boot on Linux); None when no such process exists."""
    stat = _read(f"/proc/{pid}/stat")
    if stat:
        fields = stat.rsplit(")", 1)[1].split()
        return None if fields[0] in "ZX" else fields[19]  # a zombie has ended
    if Path("/proc/self/stat").exists():
        return None  # Linux, and the process is gone
    try:  # elsewhere: only whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "?"


@dataclass(frozen=True)
class Driver:
    id: str
    host: str
    pid: int
    started: str

    @classmethod
    def this_process(cls) -> Driver:
        pid = os.getpid()
        return cls(uuid.uuid4().hex[:12], host_id(), pid, process_mark(pid) or "?")

    def tags(self) -> dict[str, str]:
        return {
            "driver": self.id,
            "driver_host": self.host,
            "driver_pid": str(self.pid),
            "driver_started": self.started,
        }


def is_alive(tags: dict[str, str], now: float | None = None) -> bool:
    """Whether the driver that claimed a run (the run's tags) may still be running."""
    if "driver" not in tags:
        return False  # left RUNNING by a version without claims: its driver is long gone
    if tags.get("driver_host") == host_id():
        return process_mark(int(tags.get("driver_pid", "0"))) == tags.get("driver_started")
    try:
        beat = float(tags.get("heartbeat", "0"))
    except ValueError:
        return False
    return (time.time() if now is None else now) - beat < STALE_S


class Heartbeat:
    """Refreshes the `heartbeat` tag of this driver's claims while they are in flight."""

    def __init__(self, client) -> None:
        self.client = client
        self.runs: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, run_id: str) -> None:
        with self._lock:
            self.runs.add(run_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
            self._thread.start()

    def discard(self, run_id: str | None) -> None:
        with self._lock:
            self.runs.discard(run_id)

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            with self._lock:
                runs = list(self.runs)
            for run_id in runs:
                try:
                    self.client.set_tag(run_id, "heartbeat", f"{time.time():.0f}")
                except Exception:  # the store is away: the spool and the next beat carry on
                    break
