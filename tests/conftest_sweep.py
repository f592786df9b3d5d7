"""Helpers for the sweep tests, and a stand-in runner (`sweep.runner=tests.conftest_sweep`).

The stand-in has the four functions of `slicemoe.run` and answers instantly, so engine behaviour
(failures, dying actors, a driver killed mid-sweep) can be provoked on purpose. By seed:
  seed 13  -> the run raises RuntimeError
  seed 66  -> the first such run SIGKILLs its own actor process (a marker file makes it once)
  seed 77  -> the run runs out of memory (MemoryError, as torch's allocators raise it)
Every load and run appends a line to $FAKE_DIR/calls.log; every run sleeps $FAKE_SLEEP seconds.
With $FAKE_GATE set to a path, runs of seed >= $FAKE_GATE_FROM wait until that file exists, so a
test decides what happens before they finish instead of racing them.
With $FAKE_BROKEN_NODE set, importing this module fails inside Ray workers (code missing there).
"""

from __future__ import annotations

import functools
import ipaddress
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from slicemoe.config import RunConfig
from sweep.jobs import RESULT_METRICS

if os.environ.get("FAKE_BROKEN_NODE") and "default_worker" in sys.argv[0]:
    raise ImportError("this node lacks the runner's dependencies")

REPO = Path(__file__).resolve().parent.parent
RUNNER = "tests.conftest_sweep"
# Small evaluations on the real tiny model: the point is the plumbing, not the accuracy.
QUICK = ["eval.limit=3", "eval.max_new_tokens=24", "batch_size=3"]


class ConfigError(ValueError):
    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def _log(line: str) -> None:
    with open(Path(os.environ["FAKE_DIR"]) / "calls.log", "a") as f:
        f.write(f"{line} pid={os.getpid()}\n")


def validate(cfg: RunConfig) -> None:
    if cfg.bits.low is not None and cfg.bits.high is not None and cfg.bits.low >= cfg.bits.high:
        raise ConfigError("bits.low", f"{cfg.bits.low} must be below bits.high={cfg.bits.high}")


def load_key(cfg: RunConfig) -> str:
    return f"{cfg.model.name}/{cfg.bits.high}/{cfg.bits.low}"


def load(cfg: RunConfig) -> dict:
    _log(f"load {load_key(cfg)}")
    return {"key": load_key(cfg)}


def run(cfg: RunConfig, loaded: dict | None = None, progress=None) -> dict:
    assert loaded is None or loaded["key"] == load_key(cfg)
    tag = f"seed={cfg.seed} frac={cfg.cache.frac} policy={cfg.policy.name}"
    _log(f"run {tag}")
    if cfg.seed == 13:
        raise RuntimeError(f"boom for {tag}")
    marker = Path(os.environ["FAKE_DIR"]) / "died.marker"
    if cfg.seed == 66 and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    if cfg.seed == 77:
        raise MemoryError(f"out of memory: tried to allocate 2.00 GiB for {tag}")
    gate = os.environ.get("FAKE_GATE")
    if gate and cfg.seed >= int(os.environ.get("FAKE_GATE_FROM", "0")):
        while not Path(gate).exists():
            time.sleep(0.1)
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    frac = cfg.cache.frac or 0.5
    result = {name: float(i) + frac for i, name in enumerate(RESULT_METRICS)}
    result["perplexity"] = math.nan
    # One correct problem in two, as a generation run reports them (sweep.tracking logs them).
    correct = [(i + cfg.seed) % 2 for i in range(cfg.eval.limit or 4)]
    result["accuracy"] = sum(correct) / len(correct)
    result["problems"] = {"correct": correct, "task": cfg.eval.task, "limit": cfg.eval.limit}
    result["curves"] = {
        "miss_rate_running": [1.0 / (i + 1) for i in range(5)],
        "energy_decode_cum_j": [0.1 * i for i in range(5)],
    }
    result["trace_path"] = None
    if cfg.trace:
        import pandas as pd

        pd.DataFrame({"step": [0, 1], "hit": [True, False]}).to_parquet(cfg.trace_path)
        result["trace_path"] = cfg.trace_path
    _log(f"done {tag}")
    return result


# --- test helpers -------------------------------------------------------------------------


def sweep_env(**extra: str) -> dict[str, str]:
    """Environment for `python -m sweep` run from a scratch directory."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HYDRA_FULL_ERROR"] = "0"
    # One torch thread, as inside a Ray actor: on a small shared box, torch's default of one
    # thread per core slows a run down by orders of magnitude when the cores are busy.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def through(ray: str | None, args: list[str], env: dict[str, str]) -> list[str]:
    """With `ray` (a head's address, see the `ray_head` fixture) the sweep joins that Ray instance
    instead of starting its own, and the stand-in's settings reach its workers as the run's
    runtime environment (the head's workers inherit the head's environment, not the driver's)."""
    if ray is None:
        return args
    # As the head was started: loopback only (else Ray turns 127.0.0.1 into the machine's
    # outward address, where nothing listens), no token.
    env.update(RAY_ADDRESS=ray, RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    fake = ",".join(f"{k}:'{v}'" for k, v in env.items() if k.startswith(("FAKE_", "MLFLOW_")))
    return [*args, f"+ray.runtime_env.env_vars={{{fake}}}"] if fake else args


def run_sweep(
    args: list[str], cwd: Path, timeout: float = 300, ray: str | None = None, **env: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sweep", *through(ray, args, env)],
        cwd=cwd,
        env=sweep_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch(args: list[str], capfd) -> tuple[int, str]:
    """`python -m sweep ARGS` in this process, for launches that stop before any work: its exit
    status and everything it printed (capfd: pytest's fixture)."""
    from sweep.__main__ import main

    argv, on_term = sys.argv, signal.getsignal(signal.SIGTERM)
    sys.argv = ["sweep", *args]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    finally:
        sys.argv = argv
        signal.signal(signal.SIGTERM, on_term)
    out, err = capfd.readouterr()
    return code, out + err


def start_sweep(args: list[str], cwd: Path, ray: str | None = None, **env: str) -> subprocess.Popen:
    """A driver in its own session, so that killing it can be aimed at it alone."""
    return subprocess.Popen(
        [sys.executable, "-m", "sweep", *through(ray, args, env)],
        cwd=cwd,
        env=sweep_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


@functools.cache
def _migrated_store() -> bytes:
    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        MlflowClient(f"sqlite:///{tmp}/mlflow.db").search_experiments()  # creates and migrates
        return Path(tmp, "mlflow.db").read_bytes()


def empty_store(folder: Path, name: str = "mlflow.db") -> str:
    """An empty MLflow store at folder/name, its tables made and migrated; returns its URI.
    Making a fresh one costs 2-5 s (dozens of migrations, each committed); this copies one made
    once per test process, which MLflow takes as is (it checks the schema's revision). For the
    sweeps whose subject is not a fresh store."""
    path = folder / name
    path.write_bytes(_migrated_store())
    return f"sqlite:///{path}"


def search(uri: str, experiment: str, filter_string: str = "") -> list:
    """All runs of an experiment (MLflow entities) matching filter_string."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string, max_results=10000)


def assert_no_metric_lost(uri: str, run) -> None:
    """A FINISHED run has every result metric, its curves at every step and its correctness
    per problem (problems.json, agreeing with its accuracy)."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert set(RESULT_METRICS) <= set(run.data.metrics), run.info.run_id
    history = client.get_metric_history(run.info.run_id, "miss_rate_running")
    assert sorted(m.step for m in history) == list(range(5)), run.info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run.info.run_id, "problems.json", tmp)
        correct = json.loads(Path(path).read_text())["correct"]
    assert sum(correct) == round(run.data.metrics["accuracy"] * len(correct)), run.info.run_id


def descendants(roots: set[int]) -> set[int]:
    """`roots` and every process below them."""
    parents: dict[int, int] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                parents[int(proc.name)] = int(
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
                )
            except (OSError, ValueError, IndexError):
                continue
    found = set(roots)
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def ray_head_pids(temp_dir: Path, gcs_port: int) -> set[int]:
    """Processes of the Ray head started with `--temp-dir temp_dir --port gcs_port`, with all
    their descendants (dashboard modules, agents, workers), so that only they are stopped and
    not other Ray instances on the machine, as a bare `ray stop` would."""
    marks = (str(temp_dir), f":{gcs_port}")
    roots = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(mark in cmdline for mark in marks):
            roots.add(int(proc.name))
    found = descendants(roots)
    found.discard(os.getpid())
    return found


def sockets_of(
    pids: set[int],
) -> list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address, int, bool]]:
    """Every TCP and UDP socket the processes `pids` hold: (protocol, local address, local port,
    listening), read from /proc (Linux)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue  # gone meanwhile
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] not in inodes:
                continue
            hex_ip, hex_port = fields[1].split(":")
            # The address is in 32-bit words of host byte order.
            raw = b"".join(bytes.fromhex(hex_ip[i : i + 8])[::-1] for i in range(0, len(hex_ip), 8))
            ip = ipaddress.ip_address(raw)
            listening = fields[3] == "0A" or proto.startswith("udp")
            found.append((proto, ip, int(hex_port, 16), listening))
    return found


def is_loopback(ip) -> bool:
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp: Path, port: int, timeout_s: float = 120) -> subprocess.Popen:
    """An `mlflow server` on 127.0.0.1 only, its store (tmp/server.db, made empty_store unless
    there) and artifacts in `tmp`; returns once it answers (polled every 0.5 s, at most
    `timeout_s`)."""
    if not (tmp / "server.db").exists():
        empty_store(tmp, "server.db")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
            f"--backend-store-uri=sqlite:///{tmp}/server.db",
            f"--artifacts-destination={tmp}/artifacts",
        ],
        cwd=tmp,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job workers
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
            return server
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                stop_server(server)
                raise RuntimeError("mlflow server did not come up") from None
            time.sleep(0.5)


def stop_server(server: subprocess.Popen) -> None:
    """Stop the server's process group (uvicorn and its worker) and wait for it."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)


def start_ray_head(temp_dir: Path, gcs_port: int, *flags: str, env: dict | None = None) -> None:
    """`ray start --head` on 127.0.0.1 with its files in temp_dir (keep the path short: Ray's
    unix sockets live under it and have a length limit)."""
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"), "start", "--head",
            "--node-ip-address=127.0.0.1", f"--port={gcs_port}", f"--temp-dir={temp_dir}",
            "--num-cpus=2", "--disable-usage-stats", *flags,
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def stop_ray_head(temp_dir: Path, gcs_port: int, grace_s: float = 10) -> None:
    pids = ray_head_pids(temp_dir, gcs_port)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.2)
        pids = {p for p in pids if Path(f"/proc/{p}").exists()}
        if not pids:
            return
