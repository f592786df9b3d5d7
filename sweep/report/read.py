"""Runs from MLflow as one row per run: params and metrics under short names, the latest run of
each run key, each run's per-problem results; and the per-run curves the figures draw."""

from __future__ import annotations

import io
import json
import os

import pandas as pd

from sweep.jobs import RESULT_METRICS

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Downloading a small CSV per stream needs no progress bar.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# MLflow column -> report column.
COLUMNS = {
    "run_id": "run_id",
    "status": "status",
    "start_time": "start_time",
    "tags.mlflow.runName": "run",
    "tags.run_key": "run_key",
    "tags.sweep_id": "sweep_id",
    "tags.mlflow.parentRunId": "parent_run_id",
    "tags.error": "error",
    "tags.replayed_from": "stream",
    "tags.stream_source": "stream_source",
    "params.model.name": "model",
    "params.bits.name": "bits",
    "params.cache.name": "cache",
    "params.cache.frac": "cache_frac",
    "params.cache.bytes": "cache_bytes",
    "params.cache.eviction": "eviction",
    "params.policy.name": "policy",
    "params.policy.tau": "tau",
    "params.hardware.name": "hardware",
    "params.eval.task": "task",
}


def search(experiment: str, tracking_uri: str | None = None) -> pd.DataFrame:
    """Every run (not sweep parents) of an experiment, as mlflow.search_runs returns them."""
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        raise SystemExit(f"no experiment {experiment!r} in {mlflow.get_tracking_uri()}")
    return mlflow.search_runs(experiment_names=[experiment], filter_string="tags.role = 'run'")


def sweep_run_ids(parent_run_id: str) -> set[str]:
    """The runs of one sweep, including runs it skipped because an earlier one finished them."""
    import mlflow

    text = mlflow.artifacts.load_text(f"runs:/{parent_run_id}/results.csv")
    return set(pd.read_csv(io.StringIO(text))["run_id"].dropna())


def tidy(runs: pd.DataFrame) -> pd.DataFrame:
    """Short column names, numeric cache sizes, one row per run key (the latest run)."""
    df = runs.rename(columns=COLUMNS)
    prefixes = ("metrics.", "params.")
    df = df.rename(columns={c: c.split(".", 1)[1] for c in df.columns if c.startswith(prefixes)})
    front = [c for c in (*COLUMNS.values(), *RESULT_METRICS) if c in df]
    rest = [c for c in df.columns if c not in front and not c.startswith("tags.")]
    df = df[front + rest].copy()
    for col in ("cache_frac", "cache_bytes", "tau"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    if "cache_capacity_bytes" in df:  # DRAM bytes, comparable across bit widths
        df["cache_size"] = df["cache_capacity_bytes"]
    elif "cache_frac" in df and "cache_bytes" in df:
        df["cache_size"] = df["cache_frac"].fillna(df["cache_bytes"])
    if "run_key" in df and "start_time" in df:
        df = df.sort_values("start_time").drop_duplicates("run_key", keep="last")
    return df.reset_index(drop=True)


def load(experiment: str, tracking_uri: str | None = None, parent: str | None = None):
    """The runs of an experiment (of the sweep with parent run id `parent`) as `tidy` leaves
    them, with a column `correct`: each finished run's per-problem results where it logged them
    (`problems`)."""
    runs = search(experiment, tracking_uri)
    if parent:
        runs = runs[runs["run_id"].isin(sweep_run_ids(parent))]
    df = tidy(runs)
    if len(df):
        df["correct"] = df["run_id"].map(problems(finished(df)["run_id"]))
    return df


def problems(run_ids) -> dict:
    """run id -> its per-problem results, 0 or 1 per problem of its task in the task's order
    (the `correct` list of problems.json), for runs that logged them (perplexity runs do not)."""
    import mlflow

    out = {}
    for r in run_ids:
        try:
            text = mlflow.artifacts.load_text(f"runs:/{r}/problems.json")
        except Exception:  # not logged: a perplexity run, or a run from before problems.json
            continue
        out[r] = [int(v) for v in json.loads(text)["correct"]]
    return out


def finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "FINISHED"] if "status" in df else df.iloc[0:0]


def step_curves(run_ids) -> dict:
    """run id -> its miss_rate_step curve, from the tracking store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return {
        r: [m.value for m in sorted(client.get_metric_history(r, "miss_rate_step"),
                                    key=lambda m: m.step)]
        for r in run_ids
    }  # fmt: skip


def miss_ratio_curves(run_ids) -> dict:
    """run id -> the miss-ratio curve it logged (miss_ratio_curve.csv), for runs that have one."""
    import mlflow

    out = {}
    for r in run_ids:
        try:
            text = mlflow.artifacts.load_text(f"runs:/{r}/miss_ratio_curve.csv")
        except Exception:  # a stream recorded with sweep.miss_ratio_points=0, or a failed curve
            continue
        out[r] = pd.read_csv(io.StringIO(text))
    return out
