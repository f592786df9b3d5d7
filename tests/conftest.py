"""One torch thread per test process. pytest-xdist runs a process per core, and torch's default of
one thread per core in each of them oversubscribes the machine: on a 2-core box a model test ran
several times slower with two workers of two threads each than with one thread each.
Without CUDA the Triton kernels run through Triton's interpreter."""

import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
# A shell without job control starts a background command with Ctrl-C ignored, and every process
# under it inherits that: the sweep drivers the tests start would then ignore the SIGINT the
# interrupt test sends them (a user's terminal delivers it). The tests run as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
if not torch.cuda.is_available():
    # Read where a kernel is defined, Triton's own helpers included: set before any test
    # imports Triton (a helper defined for the compiler fails inside an interpreted kernel).
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def ray_head():
    """One Ray instance per test process for the sweeps whose subject is not Ray's own start or
    stop (`run_sweep(..., ray=ray_head)`): a private instance costs each sweep 5-10 s here.
    Token authentication is off on this loopback-only instance; the cluster test checks it on."""
    # Imported here: the sweep's stack (Ray, Hydra, MLflow) is not needed by the other tests,
    # which also run where it is not installed (the GPU machine).
    from conftest_sweep import free_port, start_ray_head, stop_ray_head, sweep_env

    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))
    port = free_port()
    start_ray_head(
        temp / "ray", port, "--include-dashboard=false",
        env=sweep_env(RAY_AUTH_MODE="disabled", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0"),
    )  # fmt: skip
    yield f"127.0.0.1:{port}"
    stop_ray_head(temp / "ray", port, grace_s=1)  # nothing of it needs to end cleanly
    shutil.rmtree(temp, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, which may not be installed
def pytest_xdist_auto_num_workers(config):
    """`-n auto`: three workers for every two cores. An end-to-end sweep spends about half its
    time waiting for its driver, actors and servers (one alone: 48 s of CPU in 91 s), which
    the third worker fills: on a 2-core box the suite took 497 s with 3 workers, 833 s with 2
    and 654 s with 4 (one run each; four sweeps at once crowd each other out)."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux: the cores this process may use
    cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    return max(2, 3 * cores // 2)


def pytest_collection_modifyitems(items):
    """The slow tests first. xdist workers take tests in collection order: with the end-to-end
    sweeps (a minute or more each) at the start, the short tests fill the gaps between them
    instead of a few long ones trailing at the end on one worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
