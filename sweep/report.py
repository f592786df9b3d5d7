"""Tables and figures from a sweep's MLflow runs, shared by notebooks/compare_policies.ipynb.

    python -m sweep.report --experiment NAME [--tracking-uri URI] [--parent RUN_ID] [--out DIR]

writes `runs.csv` (every run with its params and metrics, failed ones included) and, for every
setting (runs equal in every config field but the policy, bit widths and cache; a sweep that
mixes e.g. two `eval.limit` values or seeds has two settings, each with its own figures,
numbered from the second on, and stderr says what was grouped and left out):
`accuracy_vs_miss_rate.png` (accuracy against the 8-bit-normalised miss rate, a line per policy
through its cache sizes, 95 % intervals from the number of documents, the Pareto front: the
shape of SliceMoE Fig. 8) and `energy_latency.png` (decode energy and latency per decoded token,
per policy and cache size, divided by those of the paper's baseline, high-bit Cache-Prior, at
the same model, cache size, hardware and task: the shape of Fig. 9). Cache sizes are bytes
independent of the bit width, so the baseline's own bits are used when the sweep ran it at
several, any single one otherwise.
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
# What the comparison figures vary: the policy, the bit widths and the cache. Every other config
# field must be equal for runs to share a figure (sweep.report.settings).
VARIED = ("policy", "bits", "cache")
# Where and how a run was executed, not what it measured.
EXECUTION = frozenset({"model.device", "model.path", "trace", "trace_path"})
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


# Report column -> the config field behind it (`tau` -> `policy.tau`).
FIELDS = {v: k.removeprefix("params.") for k, v in COLUMNS.items() if k.startswith("params.")}


def _field(column: str) -> str:
    return FIELDS.get(column, column)


def config_columns(df: pd.DataFrame) -> list[str]:
    """The report columns that hold config fields (every RunConfig field MLflow logged)."""
    from dataclasses import asdict

    from slicemoe.config import RunConfig
    from sweep.jobs import flatten

    fields = set(flatten(asdict(RunConfig())))
    return [c for c in df.columns if _field(c) in fields]


def settings(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The finished runs split into groups that may share a figure: equal in every config field
    but the policy, bit widths and cache (VARIED) and how they were executed. Each group comes
    with a description of the fields that set it apart ("" when there is one group)."""
    fin = finished(df)
    fixed = [
        c for c in config_columns(fin)
        if _field(c).split(".")[0] not in VARIED and _field(c) not in EXECUTION
    ]  # fmt: skip
    if fin.empty:
        return []
    keys = fin[fixed].astype(str)
    differ = [c for c in fixed if keys[c].nunique() > 1]
    if not differ:
        return [("", fin)]
    groups = []
    for values, group in fin.groupby([keys[c] for c in differ], sort=True):
        values = values if isinstance(values, tuple) else (values,)
        desc = " ".join(f"{_field(c)}={v}" for c, v in zip(differ, values))
        groups.append((desc, group))
    return groups


def describe(df: pd.DataFrame, groups: list[tuple[str, pd.DataFrame]]) -> str:
    """What the report grouped and what it left out, for the reader."""
    lines = [f"{len(df)} runs, {len(finished(df))} finished"]
    dropped = df[df["status"] != "FINISHED"] if "status" in df else df.iloc[0:0]
    if len(dropped):
        lines.append(f"left out {len(dropped)} runs not FINISHED: {', '.join(dropped['run'])}")
    if len(groups) > 1:
        lines.append(f"{len(groups)} settings that must not share a figure (each gets its own):")
        lines += [f"  {i}: {desc} ({len(g)} runs)" for i, (desc, g) in enumerate(groups, 1)]
    return "\n".join(lines)


def series_label(df: pd.DataFrame) -> pd.Series:
    """The policy name, plus the bit widths where they vary, plus any policy field that varies
    between runs of the same policy (e.g. `tau=0.3`): one label per line of a figure."""
    label = df["policy"].astype(str)
    if "bits" in df and df["bits"].nunique() > 1:
        label = label + " " + df["bits"].astype(str)
    own = [c for c in config_columns(df) if _field(c).startswith("policy.") and c != "policy"]
    for col in own:
        varies = df.groupby("policy")[col].transform(lambda v: v.astype(str).nunique() > 1)
        label = label.where(~varies, label + f" {_field(col).split('.')[1]}=" + df[col].astype(str))
    return label


def wilson(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion measured on n documents."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both axes (lower x, higher y), by x."""
    best, keep = float("-inf"), []
    for i, row in points.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            keep.append(i)
            best = row[y]
    return points.loc[keep]


MARKERS = "osD^vP*Xh<>p"


def plot_accuracy_vs_miss_rate(df: pd.DataFrame, metric: str = "accuracy", title: str = ""):
    """One setting's runs (see `settings`): `metric` against the 8-bit-normalised miss rate
    (the same unit for every bit width), a marker per policy, a line per series through its
    cache sizes in size order, each point labelled with its cache, 95 % intervals from the
    number of documents, and the Pareto front."""
    import matplotlib.pyplot as plt

    fin = finished(df).assign(series=lambda d: series_label(d))
    x = "miss_rate_refn"
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for i, (label, group) in enumerate(sorted(fin.groupby("series"), key=lambda kv: kv[0])):
        group = group.sort_values("cache_size")
        yerr = None
        intervals = [_interval(run, metric) for _, run in group.iterrows()]
        if metric.startswith("accuracy") and None not in intervals:
            lo, hi = (pd.Series(v, index=group.index) for v in zip(*intervals))
            yerr = [group[metric] - lo, hi - group[metric]]
        ax.errorbar(group[x], group[metric], yerr=yerr, marker=MARKERS[i % len(MARKERS)],
                    markersize=7 - 0.6 * (i % 4), capsize=3, alpha=0.85, label=label,
                    zorder=3 + i)  # fmt: skip
        for _, row in group.iterrows():
            name = str(row["cache"])
            ax.annotate(name.replace("frac_", "") + ("%" if name.startswith("frac_") else ""),
                        (row[x], row[metric]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, alpha=0.8)  # fmt: skip
    front = pareto(fin, x, metric)
    ax.step(front[x], front[metric], where="post", color="gray", linestyle=":", linewidth=1,
            label="Pareto front", zorder=1)  # fmt: skip
    ax.set_xlabel("miss rate (Flash bytes / 8-bit expert bytes used)")
    ax.set_ylabel(metric)
    n = pd.to_numeric(fin["eval.limit"], errors="coerce") if "eval.limit" in fin else None
    docs = f", n = {int(n.iloc[0])} documents per point, 95 % Wilson intervals" if (
        n is not None and n.notna().all() and n.nunique() == 1) else ""  # fmt: skip
    ax.set_title(f"{metric} vs miss rate{docs}\n{title}".strip(), fontsize=9)
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
    # The baseline's accuracy comes along, so that a reader sees what it was matched to.
    cols = [*PER_TOKEN, *(["accuracy"] if "accuracy" in base else [])]
    same_bits = base.groupby([*MATCH, "bits"], as_index=False)[cols].mean()
    single = base.groupby(MATCH).filter(lambda g: g["bits"].nunique() == 1)
    any_bits = single.groupby(MATCH, as_index=False)[cols].mean()
    out = fin.merge(same_bits, on=[*MATCH, "bits"], how="left", suffixes=("", "_base"))
    other = fin.merge(any_bits, on=MATCH, how="left", suffixes=("", "_base"))
    for col in cols:
        out[f"{col}_base"] = out[f"{col}_base"].fillna(other[f"{col}_base"])
    out["energy_norm"] = out["energy_decode_j_per_token"] / out["energy_decode_j_per_token_base"]
    out["latency_norm"] = out["latency_decode_s_per_token"] / out["latency_decode_s_per_token_base"]
    return out


def plot_energy_latency(df: pd.DataFrame, baseline: str = BASELINE):
    import matplotlib.pyplot as plt

    norm = normalise(df, baseline).assign(series=lambda d: series_label(d))
    caches = norm.sort_values("cache_size")["cache"].drop_duplicates().tolist()
    base_acc = norm.groupby("cache")["accuracy_base"].mean() if "accuracy_base" in norm else {}
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
        ax.set_xticklabels([f"{c}\n{baseline} acc {base_acc.get(c, float('nan')):.2f}"
                            for c in caches], fontsize=7)  # fmt: skip
        ax.set_xlabel("cache (and the accuracy of the baseline each bar is divided by)")
        ax.set_ylabel(f"{title} / {baseline}")
        ax.set_title(f"{title}, / {baseline} at the same model and cache size", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def warmup_groups(df: pd.DataFrame) -> list[pd.DataFrame]:
    """Within one setting: the runs of one policy, bits and cache that differ only in their
    warmup (the comparison of SliceMoE Fig. 10)."""
    if "policy.warmup" not in df:
        return []
    return [
        g for _, g in df.groupby(["policy", "bits", "cache"], sort=True)
        if g["policy.warmup"].nunique() > 1
    ]  # fmt: skip


def plot_warmup(runs: pd.DataFrame, steps: dict, window: int = 5):
    """Fig. 10's comparison for runs that differ only in `policy.warmup`: the miss rate per
    decode step (a `window`-step running mean; `steps[run_id]` is the run's miss_rate_step
    curve) and decode energy and latency per token divided by the empty cache's (by the first
    warmup's when no run started empty)."""
    import matplotlib.pyplot as plt
    import numpy as np

    runs = runs.sort_values("policy.warmup")
    ref = runs[runs["policy.warmup"] == "empty"]
    ref = ref.iloc[0] if len(ref) else runs.iloc[0]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for _, run in runs.iterrows():
        curve = np.asarray(steps.get(run["run_id"], []), float)
        if len(curve):
            smooth = pd.Series(curve).rolling(window, min_periods=1).mean()
            left.plot(smooth, label=f"{run['policy.warmup']} (all steps {run['miss_rate']:.3f})")
    left.set_xlabel("decode step")
    left.set_ylabel(f"slice miss rate ({window}-step running mean)")
    left.set_title("miss rate per decode step by warmup (legend: all-steps miss rate)", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    x = np.arange(len(runs))
    for i, (column, label) in enumerate(
        (("energy_decode_j_per_token", "energy"), ("latency_decode_s_per_token", "latency"))
    ):
        right.bar(x + 0.4 * i, runs[column] / ref[column], 0.4, label=label)
    right.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    right.set_xticks(x + 0.2)
    right.set_xticklabels(
        [f"{w}\nacc {a:.3f}" for w, a in zip(runs["policy.warmup"], runs["accuracy"])], fontsize=7
    )
    right.set_ylabel(f"per decode token / warmup={ref['policy.warmup']}")
    first = runs.iloc[0]
    right.set_title(f"{first['policy']} {first['bits']} {first['cache']}: decode cost", fontsize=9)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig


# What the paper claims for each figure (SliceMoE, Sections 5.3-5.4), shown next to ours.
CLAIMS = {
    "fig8": "DBSC (with AMAT, optionally PCW) keeps near-high-bit accuracy at a lower miss rate "
    "than the high-bit Cache-Prior baseline.",
    "fig9": "Against high-bit Cache-Prior at matched accuracy, DBSC cuts decode energy by up to "
    "2.37x (DeepSeek-V2-Lite) / 2.85x (Qwen1.5-MoE-A2.7B) and decode latency by up to 1.81x / "
    "1.64x.",
    "fig10": "PCW gives 2.31x lower decode energy and a 1.96x speed-up over an empty cache, and "
    "the best accuracy among the initial cache states.",
}
DBSC = ("dbsc", "dbsc_pcw")


def _interval(run, metric: str = "accuracy") -> tuple[float, float] | None:
    """The 95 % interval of a run's score, from its number of documents (eval.limit)."""
    n = pd.to_numeric(pd.Series([run.get("eval.limit")]), errors="coerce").iloc[0]
    return wilson(run[metric] * n, n) if n == n and n > 0 else None


def verdict(kind: str, runs: pd.DataFrame, baseline: str = BASELINE) -> str:
    """What this data says about the paper's claim for figure `kind`, in a sentence or two."""
    fin = finished(runs)
    if kind == "fig10":
        by = fin.set_index("policy.warmup")
        if not {"empty", "pcw"} <= set(by.index):
            return "needs warmup=empty and warmup=pcw runs."
        e = (
            by.loc["empty", "energy_decode_j_per_token"]
            / by.loc["pcw", "energy_decode_j_per_token"]
        )
        lat = (
            by.loc["empty", "latency_decode_s_per_token"]
            / by.loc["pcw", "latency_decode_s_per_token"]
        )
        best = by["accuracy"].max()
        acc = "the best accuracy" if by.loc["pcw", "accuracy"] >= best else "not the best accuracy"
        tie = " (tied: every warmup scores the same)" if by["accuracy"].nunique() == 1 else ""
        return (f"PCW: {e:.2f}x lower decode energy and {lat:.2f}x speed-up over an empty cache; "
                f"{acc}{tie}.")  # fmt: skip
    base = fin[fin["policy"] == baseline]
    ours = fin[fin["policy"].isin(DBSC)]
    if base.empty or ours.empty:
        return f"needs runs of {baseline} and of {' or '.join(DBSC)} at the same cache sizes."
    lines = []
    for cache, b in base.groupby("cache"):
        b = b.iloc[0]
        ci = _interval(b)
        for _, r in ours[ours["cache"] == cache].iterrows():
            matched = ci is None or r["accuracy"] >= ci[0]
            acc = (f"accuracy {r['accuracy']:.3f} vs {b['accuracy']:.3f}"
                   + ("" if matched else ", below the baseline's 95 % interval"))  # fmt: skip
            if kind == "fig8":
                lower = r["miss_rate_refn"] < b["miss_rate_refn"]
                lines.append(f"{r['policy']} at {cache}: miss rate {r['miss_rate_refn']:.3f} vs "
                             f"{b['miss_rate_refn']:.3f} ({'lower' if lower else 'not lower'}), "
                             f"{acc}.")  # fmt: skip
            else:
                e = b["energy_decode_j_per_token"] / r["energy_decode_j_per_token"]
                lat = b["latency_decode_s_per_token"] / r["latency_decode_s_per_token"]
                lines.append(f"{r['policy']} at {cache}: {e:.2f}x less energy, {lat:.2f}x faster; "
                             f"{acc}.")  # fmt: skip
    return " ".join(lines)


RUN_COLUMNS = [
    "run", "policy", "bits", "cache", "policy.warmup", "accuracy", "eval.limit", "miss_rate_refn",
    "energy_decode_j_per_token", "latency_decode_s_per_token", "run_id",
]  # fmt: skip


def write_html(out: Path, title: str, summary: str, sections: list[tuple]) -> Path:
    """A self-contained `index.html`: per figure, the paper's claim, what the data says, the
    figure (embedded) and every run behind it."""
    import base64
    import html

    parts = [f"<h1>{html.escape(title)}</h1><pre>{html.escape(summary)}</pre>"]
    for name, kind, desc, runs in sections:
        image = base64.b64encode((out / name).read_bytes()).decode()
        table = runs[[c for c in RUN_COLUMNS if c in runs]].to_html(
            index=False, float_format="%.4g"
        )
        parts.append(
            f"<h2>{html.escape(name)}{' - ' + html.escape(desc) if desc else ''}</h2>"
            f"<p><b>Paper:</b> {html.escape(CLAIMS[kind])}</p>"
            f"<p><b>This data:</b> {html.escape(verdict(kind, runs))}</p>"
            f'<img alt="{html.escape(name)}" src="data:image/png;base64,{image}">'
            f"<details><summary>the {len(runs)} runs behind it</summary>{table}</details>"
        )  # fmt: skip
    page = out / "index.html"
    page.write_text(
        "<!doctype html><meta charset='utf-8'><title>slicemoe report</title>"
        "<style>body{font-family:sans-serif;max-width:1500px;margin:auto}img{max-width:100%}"
        "table{font-size:12px;border-collapse:collapse}td,th{padding:2px 6px}</style>"
        + "".join(parts)
    )
    return page


def write_report(
    df: pd.DataFrame,
    out: Path,
    baseline: str = BASELINE,
    steps: dict | None = None,
    title: str = "slicemoe report",
) -> list[Path]:
    """runs.csv, the comparison figures of every setting (`settings`; one file per setting,
    numbered from the second on) and index.html with all of them; what was grouped and left
    out goes to stderr and to the page. `steps`: run id -> miss_rate_step curve, for the
    warmup figures."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "runs.csv"]
    df.to_csv(written[0], index=False)
    groups = settings(df)
    summary = describe(df, groups)
    print(summary, file=sys.stderr)
    if not groups:
        print("no finished runs: wrote runs.csv only", file=sys.stderr)
        return written
    sections = []
    for i, (desc, group) in enumerate(groups, 1):
        suffix = "" if i == 1 else f"_{i}"
        plots = [
            (f"accuracy_vs_miss_rate{suffix}.png", "fig8", group,
             lambda g=group, d=desc: plot_accuracy_vs_miss_rate(g, title=d)),
            (f"energy_latency{suffix}.png", "fig9", group,
             lambda g=group: plot_energy_latency(g, baseline)),
        ]  # fmt: skip
        for j, runs in enumerate(warmup_groups(group), 1):
            name = f"warmup{suffix}{'' if j == 1 else f'_{j}'}.png"
            plots.append((name, "fig10", runs, lambda r=runs: plot_warmup(r, steps or {})))
        for name, kind, runs, make in plots:
            try:
                fig = make()
            except ValueError as err:
                print(f"{name} skipped: {err}", file=sys.stderr)
                continue
            fig.savefig(out / name, dpi=120)
            plt.close(fig)
            written.append(out / name)
            sections.append((name, kind, desc, runs))
    written.append(write_html(out, title, summary, sections))
    return written


def step_curves(run_ids) -> dict:
    """run id -> its miss_rate_step curve, from the tracking store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    return {
        r: [m.value for m in sorted(client.get_metric_history(r, "miss_rate_step"),
                                    key=lambda m: m.step)]
        for r in run_ids
    }  # fmt: skip


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
    warm = [g for _, s in settings(df) for g in warmup_groups(s)]
    steps = step_curves(pd.concat(warm)["run_id"]) if warm else {}
    out = args.out or Path("report") / args.experiment
    for path in write_report(df, out, args.baseline, steps, f"slicemoe: {args.experiment}"):
        print(path)


if __name__ == "__main__":
    main()
