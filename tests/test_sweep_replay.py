"""A multirun replays every job that cannot change the model's computation from one model pass
per request stream, with the same metrics as running each job with the model in the loop."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest_sweep import QUICK, run_sweep, search
from mlflow.tracking import MlflowClient

from sweep.jobs import RESULT_METRICS

GRID = ["-m", "cache=frac_10,frac_25", "policy=lru_highbit,dbsc,cache_prior_highbit"]


def uri(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlflow.db"


def runs_by_name(tmp: Path, experiment: str) -> dict:
    runs = search(uri(tmp), experiment, "tags.role = 'run'")
    assert all(r.info.status == "FINISHED" for r in runs)
    return {r.data.tags["mlflow.runName"].split(" eval.")[0]: r for r in runs}


def problems(tmp: Path, run) -> dict:
    folder = tmp / "problems" / run.info.run_id
    folder.mkdir(parents=True)
    path = MlflowClient(uri(tmp)).download_artifacts(run.info.run_id, "problems.json", str(folder))
    return json.loads(Path(path).read_text())


@pytest.mark.slow
def test_replayed_sweep_equals_the_in_loop_sweep_and_later_sweeps_reuse_streams(tmp_path):
    points = "sweep.miss_ratio_points=4"
    replayed = run_sweep([*GRID, *QUICK, points, "mlflow.experiment=replayed"], tmp_path)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    inloop = run_sweep([*GRID, *QUICK, "sweep.replay=false", "mlflow.experiment=inloop"], tmp_path)
    assert inloop.returncode == 0, inloop.stderr[-3000:]
    a, b = runs_by_name(tmp_path, "replayed"), runs_by_name(tmp_path, "inloop")
    assert set(a) == set(b) and len(a) == 6
    for name, run in a.items():
        for m in RESULT_METRICS:
            x, y = run.data.metrics[m], b[name].data.metrics[m]
            if m != "wall_s" and not (math.isnan(x) and math.isnan(y)):
                assert math.isclose(x, y, rel_tol=1e-9), (name, m, x, y)
        assert "replayed_from" not in b[name].data.tags
        # Correctness per problem: a replayed run's is its recorded pass's, as in the loop.
        assert problems(tmp_path, run) == problems(tmp_path, b[name])
    # Cache-Prior stays in the loop; the other two policies share one model pass each.
    tags = {name: run.data.tags for name, run in a.items()}
    assert {n for n, t in tags.items() if "replayed_from" in t} == {
        n for n in a if "cache_prior" not in n
    }
    recorders = [n for n, t in tags.items() if t.get("stream_source") == "recorded"]
    assert len(recorders) == 2
    client = MlflowClient(uri(tmp_path))
    for name in recorders:
        files = {f.path for f in client.list_artifacts(a[name].info.run_id)}
        assert {"requests.npz", "miss_ratio_curve.csv", "miss_ratio_curve.png"} <= files

    # Adding a cache size later: the finished runs are skipped, the new ones replay the stored
    # streams without a model pass.
    later = run_sweep(
        ["-m", "cache=frac_10,frac_25,frac_50", "policy=lru_highbit,dbsc", *QUICK, points,
         "mlflow.experiment=replayed"],
        tmp_path,
    )  # fmt: skip
    assert later.returncode == 0, later.stderr[-3000:]
    assert "2 to run, 4 finished already" in later.stdout + later.stderr
    new = {n: r for n, r in runs_by_name(tmp_path, "replayed").items() if "frac_50" in n}
    assert len(new) == 2
    sources = sorted(r.data.tags.get("stream_source", "") for r in new.values())
    assert sources == ["stored", "stored"]
    assert not any("device" in r.data.tags for r in new.values())
