"""Tables and figures from a sweep's MLflow runs, shared by notebooks/compare_policies.ipynb.

    python -m sweep.report --experiment NAME [--tracking-uri URI] [--parent RUN_ID] [--out DIR]

writes `runs.csv` (every run with its params and metrics, failed ones included),
`accuracy_vs_miss_rate.png` (accuracy against the high-bit-normalised miss rate, one line per
policy over cache sizes: the shape of SliceMoE Fig. 8) and `energy_latency.png` (decode energy
and latency per decoded token, per policy and cache size, divided by those of the paper's
baseline, high-bit Cache-Prior, at the same model, cache size, hardware and task: the shape of
Fig. 9). Cache sizes are bytes independent of the bit width, so the baseline's own bits are
used when the sweep ran it at several, any single one otherwise.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sweep.jobs import RESULT_METRICS

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

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
# Runs that differ only in the policy are compared with each other.
SETTING = ["model", "bits", "hardware", "task", "cache"]
# A run is normalised to the baseline at the same model, cache size, hardware and task.
MATCH = ["model", "hardware", "task", "cache"]
PER_TOKEN = ["energy_decode_j_per_token", "latency_decode_s_per_token"]
BASELINE = "cache_prior_highbit"


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


def finished(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "FINISHED"] if "status" in df else df.iloc[0:0]


def series_label(df: pd.DataFrame) -> pd.Series:
    """The policy name, plus whichever of model/bits/hardware/task vary within df."""
    extra = [c for c in SETTING[:-1] if c in df and df[c].nunique() > 1]
    label = df["policy"].astype(str)
    for col in extra:
        label = label + " " + df[col].astype(str)
    return label


def plot_accuracy_vs_miss_rate(df: pd.DataFrame, metric: str = "accuracy"):
    import matplotlib.pyplot as plt

    fin = finished(df).assign(series=lambda d: series_label(d))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, group in sorted(fin.groupby("series"), key=lambda kv: kv[0]):
        group = group.sort_values("miss_rate_hbn")
        ax.plot(group["miss_rate_hbn"], group[metric], marker="o", label=label)
    ax.set_xlabel("miss rate (high-bit normalised)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs miss rate per policy (points: cache sizes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_miss_ratio_curve(table: pd.DataFrame, title: str = ""):
    """Decode miss rates of one request stream against the cache size in bytes."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    mb = table["cache_capacity_bytes"] / 1e6
    for column, label in (
        ("miss_rate", "slice miss rate (all decode steps)"),
        ("miss_rate_steady", "slice miss rate (steady state)"),
        ("miss_rate_refn", "Flash bytes / 8-bit expert bytes used"),
    ):
        ax.plot(mb, table[column], marker=".", label=label)
    ax.set_xlabel("cache capacity (MB)")
    ax.set_ylabel("miss rate")
    ax.set_ylim(bottom=0)
    ax.set_title(f"miss-ratio curve {title}".strip(), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def normalise(df: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Decode energy and latency per token divided by the baseline policy's at the same model,
    cache size, hardware and task (and bits, when the baseline ran at this run's bits)."""
    fin = finished(df).reset_index(drop=True)
    base = fin[fin["policy"] == baseline]
    if base.empty:
        raise ValueError(
            f"no finished runs of policy {baseline!r} to normalise to; add policy={baseline} to "
            "the sweep or pick another baseline"
        )
    same_bits = base.groupby([*MATCH, "bits"], as_index=False)[PER_TOKEN].mean()
    single = base.groupby(MATCH).filter(lambda g: g["bits"].nunique() == 1)
    any_bits = single.groupby(MATCH, as_index=False)[PER_TOKEN].mean()
    out = fin.merge(same_bits, on=[*MATCH, "bits"], how="left", suffixes=("", "_base"))
    other = fin.merge(any_bits, on=MATCH, how="left", suffixes=("", "_base"))
    for col in PER_TOKEN:
        out[f"{col}_base"] = out[f"{col}_base"].fillna(other[f"{col}_base"])
    out["energy_norm"] = out["energy_decode_j_per_token"] / out["energy_decode_j_per_token_base"]
    out["latency_norm"] = out["latency_decode_s_per_token"] / out["latency_decode_s_per_token_base"]
    return out


def plot_energy_latency(df: pd.DataFrame, baseline: str = BASELINE):
    import matplotlib.pyplot as plt

    norm = normalise(df, baseline).assign(series=lambda d: series_label(d))
    caches = norm.sort_values("cache_size")["cache"].drop_duplicates().tolist()
    series = sorted(norm["series"].unique())
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, column, title in (
        (axes[0], "energy_norm", "decode energy per token"),
        (axes[1], "latency_norm", "decode latency per token"),
    ):
        table = norm.groupby(["cache", "series"])[column].mean()
        for i, label in enumerate(series):
            values = [table.get((cache, label), float("nan")) for cache in caches]
            ax.bar([x + i * width for x in range(len(caches))], values, width, label=label)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(caches))])
        ax.set_xticklabels(caches)
        ax.set_xlabel("cache")
        ax.set_ylabel(f"{title} / {baseline}")
        ax.set_title(f"{title}, / {baseline} at the same model and cache size", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def write_report(df: pd.DataFrame, out: Path, baseline: str = BASELINE) -> list[Path]:
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "runs.csv"]
    df.to_csv(written[0], index=False)
    if finished(df).empty:
        print("no finished runs: wrote runs.csv only", file=sys.stderr)
        return written
    plots = [("accuracy_vs_miss_rate.png", lambda: plot_accuracy_vs_miss_rate(df))]
    plots.append(("energy_latency.png", lambda: plot_energy_latency(df, baseline)))
    for name, make in plots:
        try:
            fig = make()
        except ValueError as err:
            print(f"{name} skipped: {err}", file=sys.stderr)
            continue
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    return written


def main(argv: Sequence[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    parser = argparse.ArgumentParser(
        prog="python -m sweep.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment (mlflow.experiment)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument("--parent", help="only the runs of the sweep with this parent run id")
    parser.add_argument("--out", type=Path, help="output folder (default: report/<experiment>)")
    parser.add_argument(
        "--baseline", default=BASELINE, help="policy the per-token energy/latency are divided by"
    )
    args = parser.parse_args(argv)
    runs = search(args.experiment, args.tracking_uri)
    if args.parent:
        runs = runs[runs["run_id"].isin(sweep_run_ids(args.parent))]
    df = tidy(runs)
    for path in write_report(df, args.out or Path("report") / args.experiment, args.baseline):
        print(path)


if __name__ == "__main__":
    main()
