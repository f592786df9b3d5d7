"""The sweep with the real `slicemoe.run` on the shipped tiny model: a single run and a multirun on
local Ray; Optuna driving the launcher (the report and the notebook on a sweep: test_paper)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest_sweep import QUICK, REPO, RUNNER, empty_store, launch, run_sweep, search

from sweep.jobs import RESULT_METRICS


def uri(tmp: Path) -> str:
    return f"sqlite:///{tmp}/mlflow.db"


def test_single_run_prints_a_table_logs_to_mlflow_and_is_not_repeated(
    tmp_path, ray_head, monkeypatch, capfd
):
    empty_store(tmp_path)
    res = run_sweep(["mlflow.experiment=single", *QUICK], tmp_path, ray=ray_head)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("run "))
    header, row = lines[at : at + 2]
    assert header.split()[:3] == ["run", "status", "accuracy"]
    assert row.startswith(" ".join(QUICK)) and "FINISHED" in row
    # The run's bar, as lines (stderr is no terminal here): from none to all of its documents.
    assert re.search(r"^\[run\]:   0%\|.* 0/3 \[", res.stderr, re.M), res.stderr[-2000:]
    assert re.search(r"^\[run\]: 100%\|.* 3/3 \[.* tok/s\]$", res.stderr, re.M)
    (run,) = search(uri(tmp_path), "single")
    assert run.info.status == "FINISHED" and set(RESULT_METRICS) <= set(run.data.metrics)
    assert "mlflow.parentRunId" not in run.data.tags

    # Found finished, nothing to compute: in this process (conftest_sweep.launch).
    monkeypatch.chdir(tmp_path)
    code, out = launch(["mlflow.experiment=single", *QUICK], capfd)
    assert code == 0 and "finished already" in out
    assert len(search(uri(tmp_path), "single")) == 1


@pytest.fixture(scope="module")
def policy_sweep(tmp_path_factory, ray_head):
    """Two policies (one the Cache-Prior baseline) x two cache sizes, with traces, on a fresh
    store (not conftest_sweep.empty_store): making it must print nothing either."""
    tmp = tmp_path_factory.mktemp("policy_sweep")
    args = [
        "-m",
        "mlflow.experiment=policies",
        "cache=frac_10,frac_25",
        "policy=cache_prior_highbit,dbsc",
        "ray.num_actors=1",  # a second actor's start (torch, the model) costs more than it saves
    ]
    res = run_sweep([*args, "trace=true", *QUICK], tmp, ray=ray_head)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return tmp, res


@pytest.mark.slow
def test_multirun_logs_one_parent_and_a_child_per_job(policy_sweep):
    tmp, res = policy_sweep
    assert "[sweep] 4/4 done | 0 running | 0 failed | 0 skipped" in res.stderr
    # A bar per model pass, told by the actors, under the names of the runs it serves.
    passes = re.findall(r"^\[run\] (.+?): 100%\|.* 3/3 \[", res.stderr, re.M)
    policies = {re.search(r"policy=(\S+)", p).group(1) for p in passes}
    assert policies == {"cache_prior_highbit", "dbsc"}, res.stderr[-3000:]
    (parent,) = search(uri(tmp), "policies", "tags.role = 'sweep'")
    # Quiet, and it says where the results went.
    assert f"results: MLflow parent run {parent.info.run_id}" in res.stdout
    assert "mlflow ui --backend-store-uri" in res.stdout
    for noise in ("\x1b[", "Loading weights", "Token authentication", "Creating initial MLflow",
                  "Downloading artifacts"):  # fmt: skip
        assert noise not in res.stdout + res.stderr, noise
    children = search(uri(tmp), "policies", "tags.role = 'run'")
    assert len(children) == 4
    names = set()
    for run in children:
        tags = run.data.tags
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert tags["sweep_id"] == parent.data.tags["sweep_id"]
        assert tags["run_key"] and tags["git_commit"] and tags["host"]
        # The model ran (on the CPU) for runs in the loop and for a stream's recording run.
        if "replayed_from" not in tags or tags.get("stream_source") == "recorded":
            assert tags["device"] == "cpu"
        assert set(RESULT_METRICS) <= set(run.data.metrics)
        assert run.data.params["model.name"] == "tiny"
        names.add(tags["mlflow.runName"])
    assert names == {
        f"cache={c} policy={p} trace=True {' '.join(QUICK)}"
        for c in ("frac_10", "frac_25")
        for p in ("cache_prior_highbit", "dbsc")
    }
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri(tmp))
    run_id = children[0].info.run_id
    assert {"config.yaml", "trace.parquet"} <= {a.path for a in client.list_artifacts(run_id)}
    steps = [m.step for m in client.get_metric_history(run_id, "energy_decode_cum_j")]
    assert steps == list(range(len(steps))) and len(steps) > 1
    assert "results.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_optuna_sweeper_drives_the_launcher(tmp_path, ray_head):
    """Optuna asks, the launcher runs, the metrics go back: the stand-in runner answers at once
    (the real model in the loop of a multirun is the test above). One trial at a time: two
    batches on one actor, the second on the pool and parent run of the first."""
    empty_store(tmp_path)
    args = [
        "-m",
        "+experiment=optuna_dbsc_tau",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=1",
        "mlflow.experiment=optuna",
        f"sweep.runner={RUNNER}",
    ]
    res = run_sweep(args, tmp_path, ray=ray_head, FAKE_DIR=str(tmp_path))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Number of Pareto solutions" in res.stdout + res.stderr
    results = list((tmp_path / "multirun").glob("*/*/optimization_results.yaml"))
    assert len(results) == 1 and "solutions:" in results[0].read_text()
    runs = search(uri(tmp_path), "optuna", "tags.role = 'run'")
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert all("policy.tau=" in r.data.tags["mlflow.runName"] for r in runs)


def test_console_script_entry_point_is_the_app():
    import sweep.__main__ as entry

    assert entry._hydra_main.__module__ == "sweep.app"
    assert os.path.exists(REPO / "conf" / "config.yaml")
