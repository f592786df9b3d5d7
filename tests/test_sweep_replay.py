"""A multirun replays every job from one model pass per request stream (the jobs whose requests
depend on the cache share a pass only with those that differ in hardware), with the same metrics
as running each job with the model in the loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest_sweep import QUICK, run_sweep, search
from hydra import compose, initialize_config_dir
from mlflow.tracking import MlflowClient

from slicemoe.run import run
from sweep import app, schema
from sweep.jobs import RESULT_METRICS

POINTS = "sweep.miss_ratio_points=4"


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


def in_the_loop(overrides: list[str]) -> dict:
    """The job's run with the model in the loop, in this process."""
    with initialize_config_dir(app.CONF_DIR, version_base="1.3"):
        return run(schema.run_config(compose("config", overrides=overrides)))


@pytest.mark.slow
def test_replayed_sweep_equals_the_model_in_the_loop_and_later_sweeps_reuse_streams(
    tmp_path, ray_head
):
    grid = [
        "-m", "cache=frac_10,frac_25", "policy=dbsc,cache_prior_highbit",
        "hardware=mobile_lpddr4_ufs31,laptop_lpddr5_nvme",
    ]  # fmt: skip
    replayed = run_sweep(
        [*grid, *QUICK, POINTS, "mlflow.experiment=replayed"], tmp_path, ray=ray_head
    )
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    a = runs_by_name(tmp_path, "replayed")
    assert len(a) == 8
    # DBSC's four runs share one model pass; Cache-Prior's requests depend on the cache, so each
    # cache size has its own pass, replayed under both hardware profiles.
    tags = {name: run.data.tags for name, run in a.items()}
    passes = {}
    for name, t in tags.items():
        passes.setdefault(t["replayed_from"], []).append(name)
    assert sorted(map(len, passes.values())) == [2, 2, 4]
    recorders = [n for n, t in tags.items() if t.get("stream_source") == "recorded"]
    assert len(recorders) == 3 and {tags[n]["stream_key"] for n in recorders} == set(passes)
    recorder = next(n for n in recorders if "dbsc" in n)
    files = {f.path for f in MlflowClient(uri(tmp_path)).list_artifacts(a[recorder].info.run_id)}
    assert {"requests.npz", "miss_ratio_curve.csv", "miss_ratio_curve.png"} <= files
    for name in (n for n in a if "laptop" in n and ("frac_25" in n or "cache_prior" in n)):
        # The run name is the job's overrides.
        expected = in_the_loop(name.split())
        for m in RESULT_METRICS:
            x, y = a[name].data.metrics[m], expected[m]
            if m != "wall_s" and not (math.isnan(x) and math.isnan(y)):
                assert math.isclose(x, y, rel_tol=1e-9), (name, m, x, y)
        # Correctness per problem: a replayed run's is its recorded pass's, as in the loop.
        assert problems(tmp_path, a[name])["correct"] == expected["problems"]["correct"]

    # Adding a cache size later: the finished runs are skipped, the new one replays the stored
    # stream without a model pass.
    later = run_sweep(
        ["-m", "cache=frac_10,frac_25,frac_50", "policy=dbsc", *QUICK, POINTS,
         "mlflow.experiment=replayed"],
        tmp_path,
        ray=ray_head,
    )  # fmt: skip
    assert later.returncode == 0, later.stderr[-3000:]
    assert "1 to run, 2 finished already" in later.stdout + later.stderr
    (new,) = [r for n, r in runs_by_name(tmp_path, "replayed").items() if "frac_50" in n]
    assert new.data.tags.get("stream_source") == "stored" and "device" not in new.data.tags
