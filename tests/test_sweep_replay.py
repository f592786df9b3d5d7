"""A multirun replays every job from one model pass per request stream (the jobs whose requests
depend on the cache share a pass only with those that differ in hardware), with the same metrics
as running each job with the model in the loop: the paper's grid, small, as its benchmark runs
it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from conftest_sweep import REPO, empty_store, search, sweep_env, through
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from slicemoe.config import RunConfig
from slicemoe.hardware import PROFILES
from slicemoe.run import run
from sweep.jobs import RESULT_METRICS
from sweep.launcher import timing_key
from sweep.tracking import Tracker

DATA = REPO.parent / "shared/data"


def uri(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlflow.db"


def runs_by_name(tmp: Path, experiment: str) -> dict:
    runs = search(uri(tmp), experiment, "tags.role = 'run'")
    assert all(r.info.status == "FINISHED" for r in runs)
    return {r.data.tags["mlflow.runName"]: r for r in runs}


def problems(tmp: Path, run) -> dict:
    folder = tmp / "problems" / run.info.run_id
    folder.mkdir(parents=True)
    path = MlflowClient(uri(tmp)).download_artifacts(run.info.run_id, "problems.json", str(folder))
    return json.loads(Path(path).read_text())


def in_the_loop(tmp: Path, logged) -> dict:
    """The config of a logged run (its config.yaml), run with the model in the loop here."""
    folder = tmp / "config" / logged.info.run_id
    folder.mkdir(parents=True)
    path = MlflowClient(uri(tmp)).download_artifacts(logged.info.run_id, "config.yaml", str(folder))
    merged = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path))
    return run(OmegaConf.to_object(merged))


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="GSM8K and WikiText-2 are not at ../shared/data")
def test_the_paper_grid_replays_each_pass_as_the_model_in_the_loop(tmp_path, ray_head, monkeypatch):
    """benchmarks/paper_grid.py --small: the paper's grid on the tiny model through the sweep
    (Table 1 and the report included). The cache-independent policies share a pass per
    precision; each cache-aware one records its own and replays it under both hardware profiles;
    replayed metrics equal the model in the loop. (Replays as Ray tasks: tests/
    test_sweep_cluster.py; a stored stream replayed by a later sweep: tests/test_sweep_units.py.)"""
    monkeypatch.setenv("SLICEMOE_DATA", str(DATA))  # the grid's data paths, when composed here
    env: dict[str, str] = {}
    joins = through(ray_head, [], env)  # sets RAY_ADDRESS in env
    row_file, out = tmp_path / "row.json", tmp_path / "grid"
    out.mkdir()
    empty_store(out)  # where the benchmark keeps its store
    command = [
        sys.executable, str(REPO / "benchmarks/paper_grid.py"), "--small", "--device", "cpu",
        "--out", str(out), "--json", str(row_file), "--", *joins,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=tmp_path, env=sweep_env(**env), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (
        "plan: 2 model passes recording 5 streams (1 passes packed with 4 streams) feeding 9 "
        "replays (in the actors"
    ) in done.stdout
    row = json.loads(row_file.read_text())
    # LRU low-bit, DBSC+PCW, Cumsum and Cache-Prior under two profiles, and one Table 1 row: a
    # stream each.
    assert (row["runs"], row["finished"], row["replays"]) == (9, 9, 9)
    # The four GSM8K streams recorded in one model pass (sweep.pack_rows), each its own rows.
    assert (row["passes"], row["streams"]) == (2, 5)
    assert {"accuracy_vs_miss_rate.png", "energy_latency.png"} <= set(row["figures"])
    runs = runs_by_name(out, "paper_grid")
    passes: dict[str, list] = {}
    for r in runs.values():
        passes.setdefault(r.data.tags["replayed_from"], []).append(r.data.params)
    for params in passes.values():
        if params[0]["policy.routing"] != "topk":
            assert sorted(p["hardware.name"] for p in params) == sorted(PROFILES)
    client = MlflowClient(uri(out))
    (recorder,) = [
        r for r in runs.values()
        if r.data.tags.get("stream_source") == "recorded" and r.data.params["policy.name"] == "dbsc_pcw"
    ]  # fmt: skip
    files = {f.path for f in client.list_artifacts(recorder.info.run_id)}
    assert {"requests.npz", "miss_ratio_curve.csv", "miss_ratio_curve.png"} <= files
    # Every replayed run of a cache-independent stream is set beside Belady's oracle
    # (slicemoe.optimality); one without a warmup that inserts is never better than it.
    assert {"optimality_layers.csv", "reuse_distance.csv"} <= files
    assert all(
        r.data.metrics["belady_gap"] >= 0
        for r in runs.values()
        if r.data.params["policy.name"] == "lru_lowbit"
    )
    for name in runs:
        # Cache-independent replays are held to the loop in tests/test_replay.py.
        if "laptop" in name and "cache_prior" in name:
            expected = in_the_loop(out, runs[name])
            for m in RESULT_METRICS:
                x, y = runs[name].data.metrics[m], expected[m]
                if m != "wall_s" and not (math.isnan(x) and math.isnan(y)):
                    assert math.isclose(x, y, rel_tol=1e-9), (name, m, x, y)
            # Correctness per problem: a replayed run's is its recorded pass's, as in the loop.
            assert problems(out, runs[name])["correct"] == expected["problems"]["correct"]

    # A later launch's plan estimates its time from these runs (model, task and size).
    tracker = Tracker(uri(out), client.get_experiment_by_name("paper_grid").experiment_id)
    passes_s, replay_s = tracker.timings()[timing_key("tiny", "gsm8k", 2)]
    assert passes_s > 0 and replay_s > 0
