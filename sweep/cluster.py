"""Joining Ray (a private local instance or a running cluster) and sizing the actor pool.

A private instance dies with its driver, but for the agents its raylet starts (dashboard agent,
runtime-env agent): a driver killed with SIGKILL leaves them running for a minute or more, each
holding memory. Each driver that starts one therefore notes it in INSTANCES (the driver's pid and
the instance's session folder), and the next launch on this machine ends the Ray processes that
hold a file of such an instance's session open once its driver is gone. Another Ray instance has
a session of its own: it is never touched.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sweep.drivers import process_mark
from sweep.errors import SweepError

if TYPE_CHECKING:  # the schema imports the model registries, which an actor does not need
    from sweep.schema import RayConf

INSTANCES = Path(tempfile.gettempdir()) / f"slicemoe-ray-{os.getuid()}"


@dataclass
class Plan:
    actors: int
    num_cpus: float
    num_gpus: float
    replay_tasks: bool = False  # replays as one-CPU tasks beside the actors (ray.replay_tasks)
    free_cpus: float = 0.0  # the cluster's CPUs the actors leave


def address_of(conf: RayConf) -> str:
    # Inside `ray job submit` Ray sets RAY_ADDRESS, so the same command line attaches to the
    # job's cluster without a ray.address override.
    return conf.address or os.environ.get("RAY_ADDRESS") or "local"


def connect(conf: RayConf) -> str:
    """ray.init once per process; returns the address joined."""
    address = address_of(conf)
    if address == "local":
        # Ray binds its servers (GCS, raylet, workers, agents, metrics exporters) to the node's
        # address, on Linux the machine's outward one. Without cluster support (Ray's own
        # default on macOS and Windows) the node is 127.0.0.1 and nothing listens beyond this
        # machine. Read when ray is first imported, and inherited by every process it starts.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.exceptions import AuthenticationError

    if ray.is_initialized():
        return address
    kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
    if conf.runtime_env:
        kwargs["runtime_env"] = dict(conf.runtime_env)
    if address == "local":
        end_orphans()
        # A private instance for this sweep: no dashboard (saves ~1 GB), a small object store
        # (runs exchange only small dicts). Ray sets up its token locally and says so on every
        # launch, and announces the instance: neither is news here.
        kwargs.update(
            include_dashboard=False,
            object_store_memory=conf.object_store_mb * 2**20,
            logging_level=logging.WARNING,
        )
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
            logging.ERROR
        )
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no ANSI codes in log files
    # ray.init installs a native SIGTERM handler that dumps and aborts; the process keeps its own
    # (sweep.__main__ closes the runs in flight and exits 143).
    on_term = signal.getsignal(signal.SIGTERM)
    try:
        context = _init(ray, kwargs, tries=3 if address == "local" else 1)
    except ConnectionError as err:
        raise SweepError(
            f"ray.address={address}: no Ray cluster answered ({err}). Start one (ray start "
            "--head), fix the address, or drop ray.address to run on a private local instance"
        ) from None
    except AuthenticationError as err:
        raise SweepError(
            f"ray.address={address}: the cluster refused this client's token ({err}). Token "
            "authentication is on: export RAY_AUTH_MODE=token and make the cluster's token "
            "available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
        ) from None
    if on_term is not None:
        signal.signal(signal.SIGTERM, on_term)
    if address == "local":
        note_instance(context.address_info["session_dir"])
    return address


def note_instance(session_dir: str) -> None:
    """Note this driver's private instance, for the launch after a kill -9 to end."""
    pid = os.getpid()
    note = {"pid": pid, "started": process_mark(pid), "session_dir": session_dir}
    try:
        INSTANCES.mkdir(exist_ok=True)
        (INSTANCES / f"{pid}.json").write_text(json.dumps(note))
    except OSError:
        pass  # a full or read-only temp folder: the sweep runs all the same


def end_orphans() -> None:
    """End what is left of the private instances whose driver is gone (Linux: read from /proc)."""
    for path in INSTANCES.glob("*.json"):
        try:
            note = json.loads(path.read_text())
            if process_mark(int(note["pid"])) == note["started"]:
                continue  # its driver runs
            session_dir = str(note["session_dir"])
        except (OSError, ValueError, KeyError, TypeError):
            session_dir = ""  # half written, or not ours: nothing to go by
        for pid in processes_of(session_dir) if session_dir else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # gone meanwhile
        path.unlink(missing_ok=True)


def processes_of(session_dir: str) -> list[int]:
    """The Ray processes of the instance with the session folder `session_dir`: titled `ray::`
    (agents, workers) or run from Ray's package (its servers), holding a file of that folder
    open (each logs there). A viewer of those logs is no Ray process."""
    inside = session_dir.rstrip("/") + "/"
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            titled = (proc / "cmdline").read_bytes().startswith(b"ray::")
            if not (titled or "/ray/" in os.readlink(proc / "exe")):
                continue
            if any(_target(fd).startswith(inside) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue  # another user's, or gone
    return found


def _target(fd: Path) -> str:
    try:
        return os.readlink(fd)
    except OSError:
        return ""  # closed meanwhile


def _init(ray, kwargs: dict, tries: int) -> Any:
    """ray.init (its context), tried again where a private instance's node did not register in
    time: Ray gives a starting raylet 30 s, which a box busy with other Ray instances can
    exceed."""
    for attempt in range(1, tries + 1):
        try:
            return ray.init(**kwargs)
        except Exception as err:
            if attempt == tries or "timed out during startup" not in str(err):
                raise
            ray.shutdown()
            print(
                f"[sweep] the local Ray instance did not start in time; trying again "
                f"({attempt + 1} of {tries})",
                file=sys.stderr,
            )


def plan(conf: RayConf, n_jobs: int, resources: dict[str, float]) -> Plan:
    """How many actors, with which resources each, for n_jobs runs on a cluster with
    `resources` (as ray.cluster_resources() reports them)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    per_gpu = conf.num_gpus_per_actor
    if per_gpu is None:
        per_gpu = 1.0 if gpus >= 1 else 0.0
    if per_gpu > gpus:
        raise SweepError(
            f"ray.num_gpus_per_actor={per_gpu} but the cluster has {gpus:g} GPUs; lower it or "
            "set ray.num_gpus_per_actor=0 to run on CPUs"
        )
    per_cpu = conf.num_cpus_per_actor
    tasks = per_gpu > 0 if conf.replay_tasks is None else conf.replay_tasks
    if conf.num_actors is not None:
        actors = conf.num_actors
    else:
        # Replay tasks need a CPU the actors leave free.
        actors = math.floor((cpus - tasks) / per_cpu) if per_cpu > 0 else n_jobs
        if per_gpu > 0:
            actors = min(actors, math.floor(gpus / per_gpu))
    actors = max(1, min(actors, n_jobs))
    # Actors hold their CPUs for life: with none left over, a task would wait for ever.
    free = max(0.0, cpus - actors * per_cpu)
    return Plan(actors, per_cpu, per_gpu, replay_tasks=tasks and free >= 1, free_cpus=free)
