"""Tables and figures from a sweep's MLflow runs, shared by notebooks/compare_policies.ipynb.

    python -m sweep.report --experiment NAME [--tracking-uri URI] [--parent RUN_ID] [--out DIR]

writes `runs.csv` (every run with its params and metrics, failed ones included), `index.html`
(self-contained: every figure and table next to the paper's claim and what these runs say of it,
with the runs behind each) and, for every setting (runs equal in every config field but the
policy, bit widths and cache; a sweep that mixes e.g. two `eval.limit` values or seeds has two
settings, each with its own files, a name that comes again numbered from its second on, and
stderr says what was grouped and left out):
- `accuracy_vs_miss_rate.png`: accuracy against the 8-bit-normalised miss rate, a line per
  policy through its cache sizes, 95 % intervals from the number of documents, the Pareto front
  (the shape of SliceMoE Fig. 8);
- `energy_latency.png`: decode energy gain and speed-up per decoded token over the paper's
  baseline, high-bit Cache-Prior, at matched accuracy: each run against the cheapest baseline
  run at its model, cache size, hardware and task that is at least as accurate (Fig. 9);
- `warmup.png`: runs that differ only in their cache warmup, miss rate per decode step and
  decode cost against the empty cache (Fig. 10);
- `miss_ratio_curves.png`: the miss-ratio curve of every request stream the sweep recorded,
  with the sweep's runs of that stream on it;
- `table1.md` and `table1.csv`: for runs on a text (perplexity), Table 1's layout: the high-bit
  path and each scheme's low path at each Matryoshka bit width.
Where a policy's runs differ in warmup, Figs. 8 and 9 keep the warmup it ran at the most cache
sizes (the others are the warmup figure's).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _wrap(title: str, width: int = 95) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in title.strip().splitlines())


def main_warmups(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Figs. 8 and 9 compare policies: of a policy whose runs differ in `policy.warmup`, keep the
    warmup it ran at the most cache sizes (all of them on a tie). Returns the runs kept and how
    many were left to the warmup figure."""
    if "policy.warmup" not in df:
        return df, 0
    keep = pd.Series(True, index=df.index)
    for _, runs in df.groupby("policy"):
        reach = runs.groupby("policy.warmup")["cache"].nunique()
        if len(reach) > 1 and (reach == reach.max()).sum() == 1:
            keep[runs.index] = runs["policy.warmup"] == reach.idxmax()
    return df[keep], int((~keep).sum())


def plot_accuracy_vs_miss_rate(df: pd.DataFrame, metric: str = "accuracy", title: str = ""):
    """One setting's runs (see `settings`): `metric` against the 8-bit-normalised miss rate
    (the same unit for every bit width), a marker per policy, a line per series through its
    cache sizes in size order, each point labelled with its cache, 95 % intervals from the
    number of documents, and the Pareto front."""
    import matplotlib.pyplot as plt

    fin = finished(df).assign(series=lambda d: series_label(d))
    policies = sorted(fin["policy"].unique())
    x = "miss_rate_refn"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (label, group) in enumerate(sorted(fin.groupby("series"), key=lambda kv: kv[0])):
        group = group.sort_values("cache_size")
        p = policies.index(group["policy"].iloc[0])
        yerr = None
        intervals = [_interval(run, metric) for _, run in group.iterrows()]
        if metric.startswith("accuracy") and None not in intervals:
            lo, hi = (pd.Series(v, index=group.index) for v in zip(*intervals))
            yerr = [group[metric] - lo, hi - group[metric]]
        # Sizes differ by policy, so that a policy drawn over another one still shows.
        ax.errorbar(group[x], group[metric], yerr=yerr, marker=MARKERS[p % len(MARKERS)],
                    markersize=8 - 0.8 * (p % 4), color=f"C{i % 10}", capsize=3, alpha=0.85,
                    label=label, zorder=3 + i)  # fmt: skip
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
    ax.set_title(_wrap(f"{metric} vs miss rate{docs}\n{title}"), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
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


def streams(runs: pd.DataFrame, curves: dict) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """(label, miss-ratio curve, the runs replayed from it) per request stream recorded for
    these runs; `curves[run_id]` is the curve logged by the run that recorded a stream."""
    if "stream" not in runs:
        return []
    out = []
    for _, members in runs.dropna(subset=["stream"]).groupby("stream", sort=False):
        recorders = [r for r in members["run_id"] if r in curves]
        if recorders:
            first = members.iloc[0]
            label = f"{'/'.join(sorted(members['policy'].unique()))} {first['bits']}"
            out.append((label, curves[recorders[0]], members))
    return sorted(out, key=lambda s: s[0])


def plot_miss_ratio_curves(runs: pd.DataFrame, curves: dict, title: str = ""):
    """Every recorded stream's 8-bit-normalised miss rate against the cache size (one model pass
    replayed at each size), and the sweep's runs of that stream as points on it."""
    import matplotlib.pyplot as plt

    found = streams(finished(runs), curves)
    if not found:
        raise ValueError("no run of this setting recorded a stream with a miss-ratio curve")
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, table, members) in enumerate(found):
        ax.plot(table["cache_capacity_bytes"] / 1e6, table["miss_rate_refn"], color=f"C{i % 10}",
                linewidth=1.2, label=label)  # fmt: skip
        ax.plot(members["cache_size"] / 1e6, members["miss_rate_refn"], "o", color=f"C{i % 10}",
                markersize=5)  # fmt: skip
    ax.set_xlabel("cache capacity for routed experts (MB)")
    ax.set_ylabel("miss rate (Flash bytes / 8-bit expert bytes used)")
    ax.set_ylim(bottom=0)
    ax.set_title(_wrap(f"miss-ratio curve per request stream (points: the sweep's runs)\n{title}"),
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _candidates(run, base: pd.DataFrame) -> pd.DataFrame:
    """The baseline's runs at `run`'s model, cache size, hardware and task: at the run's bits
    when the baseline ran there, else at its one bit width (none when it ran at several)."""
    same = base
    for col in MATCH:
        same = same[same[col] == run[col]]
    if (same["bits"] == run["bits"]).any():
        return same[same["bits"] == run["bits"]]
    return same if same["bits"].nunique() == 1 else same.iloc[0:0]


def matched_baseline(run, base: pd.DataFrame):
    """(the baseline run `run` is compared with, whether it matches the run's accuracy): of
    `_candidates`, the cheapest in decode energy per token that is at least as accurate as the
    run; when none is, the most accurate (False). None and None without a candidate; the
    cheapest and None when there is no accuracy to match."""
    cands = _candidates(run, base)
    if cands.empty:
        return None, None
    energy = PER_TOKEN[0]
    acc = run.get("accuracy", float("nan"))
    if "accuracy" not in cands or acc != acc:
        return cands.sort_values(energy).iloc[0], None
    good = cands[cands["accuracy"] >= acc]
    if len(good):
        return good.sort_values(energy).iloc[0], True
    return cands.sort_values(["accuracy", energy], ascending=[False, True]).iloc[0], False


def normalise(df: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Decode energy and latency per token of every run divided by its matched baseline run's
    (`matched_baseline`): columns `energy_norm`, `latency_norm`, the baseline's values
    (`*_base`), its series label (`baseline`) and `matched`."""
    fin = finished(df).reset_index(drop=True).copy()  # one block: columns are added below
    fin = fin.assign(series=series_label(fin)) if len(fin) else fin
    base = fin[fin["policy"] == baseline]
    if base.empty:
        raise ValueError(
            f"no finished runs of policy {baseline!r} to normalise to; add policy={baseline} to "
            "the sweep or pick another baseline"
        )
    cols = [*PER_TOKEN, *(["accuracy"] if "accuracy" in base else [])]
    picked = []
    for _, run in fin.iterrows():
        b, matched = matched_baseline(run, base)
        values = {f"{c}_base": float("nan") if b is None else b[c] for c in cols}
        picked.append(values | {"baseline": None if b is None else b["series"], "matched": matched})
    out = pd.concat([fin, pd.DataFrame(picked, index=fin.index)], axis=1)
    # True, False or None (no accuracy to match), kept as such rather than as numpy bools.
    out["matched"] = pd.Series([p["matched"] for p in picked], index=fin.index, dtype=object)
    out["energy_norm"] = out[PER_TOKEN[0]] / out[f"{PER_TOKEN[0]}_base"]
    out["latency_norm"] = out[PER_TOKEN[1]] / out[f"{PER_TOKEN[1]}_base"]
    return out


def plot_energy_latency(df: pd.DataFrame, baseline: str = BASELINE):
    """Per cache size and series, the decode energy gain and speed-up per token over the matched
    baseline run (`matched_baseline`, named above each bar when the baseline ran at several
    settings; hatched: no baseline run was as accurate)."""
    import matplotlib.pyplot as plt

    norm = normalise(df, baseline)
    several = norm.loc[norm["policy"] == baseline, "series"].nunique() > 1
    norm = norm[norm["policy"] != baseline]
    if norm.empty:
        raise ValueError(f"only {baseline} runs: nothing to compare with it")
    caches = norm.sort_values("cache_size")["cache"].drop_duplicates().tolist()
    series = sorted(norm["series"].unique())
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, column, title in (
        (axes[0], "energy_norm", "decode energy gain per token"),
        (axes[1], "latency_norm", "decode speed-up per token"),
    ):
        for i, label in enumerate(series):
            for j, cache in enumerate(caches):
                runs = norm[(norm["series"] == label) & (norm["cache"] == cache)]
                if runs.empty:
                    continue
                run = runs.iloc[0]
                x, gain = j + i * width, 1 / run[column]
                ax.bar(x, gain, width, color=f"C{i % 10}",
                       hatch="//" if run["matched"] is False else None,
                       edgecolor="black", linewidth=0.4)  # fmt: skip
                if several and run["baseline"]:
                    ax.annotate(run["baseline"].removeprefix(baseline).strip(), (x, gain),
                                textcoords="offset points", xytext=(0, 2), ha="center",
                                rotation=90, fontsize=6)  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(caches))])
        ax.set_xticklabels(caches, fontsize=8)
        ax.set_xlabel("cache size")
        ax.set_ylabel(f"{title}: {baseline} / run")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    from matplotlib.patches import Patch

    handles = [Patch(color=f"C{i % 10}", label=label) for i, label in enumerate(series)]
    handles.append(Patch(facecolor="white", edgecolor="black", hatch="//",
                         label="no baseline run as accurate"))  # fmt: skip
    axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle(
        f"Each bar: the run against the cheapest {baseline} run at its cache size that is at "
        "least as accurate (named above the bar);\nhatched: no baseline run was as accurate, "
        "so the most accurate one",
        fontsize=8,
    )
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


def _number(value) -> float:
    return float(pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0])


def table1_cells(runs: pd.DataFrame) -> dict:
    """Perplexities of runs on a text, keyed as `slicemoe.table1` keys them ((quantizer, scheme,
    h, l, bits), "fp"): top-k runs with every expert at the high-bit path fill that cell of each
    scheme of their quantizer (it does not depend on the scheme), runs at the low path their
    scheme's cell, and unquantized experts "fp"."""
    from slicemoe.table1 import ROWS

    out = {}
    for _, run in finished(runs).iterrows():
        if run.get("policy.routing", "topk") != "topk" or run["perplexity"] != run["perplexity"]:
            continue
        high, low = _number(run["bits.high"]), _number(run["bits.low"])
        path = run["policy.precision"]
        symmetric = str(run["bits.symmetric"]).lower() == "true"
        if high != high:
            if path == "high":
                out["fp"] = run["perplexity"]
            continue
        if low != low:
            continue
        h, l = int(high), int(low)
        for quantizer, scheme in ROWS:
            if (quantizer == "Sym") != symmetric:
                continue
            if path == "high" or (path == "low" and scheme == run["bits.scheme"]):
                out[(quantizer, scheme, h, l, h if path == "high" else l)] = run["perplexity"]
    return out


def table1_frame(cells: dict) -> pd.DataFrame:
    from slicemoe.table1 import header, rows

    return pd.DataFrame(rows(cells), columns=header())


# What the paper claims for each figure (SliceMoE, Sections 4.2, 5.3-5.4), shown next to ours.
CLAIMS = {
    "table1": "Low-bit truncation alone (Trunc) degrades the model severely, whereas AMAT's low-bit "
    "path stays compatible with, and can even beat, independently quantized low-bit experts "
    "(Base) (WikiText-2 perplexity of DeepSeek-V2-Lite and Qwen1.5-MoE).",
    "fig8": "DBSC (with AMAT, optionally PCW) keeps near-high-bit accuracy at a lower miss rate "
    "than the high-bit Cache-Prior baseline.",
    "fig9": "Against high-bit Cache-Prior at matched accuracy, DBSC cuts decode energy by up to "
    "2.37x (DeepSeek-V2-Lite) / 2.85x (Qwen1.5-MoE-A2.7B) and decode latency by up to 1.81x / "
    "1.64x.",
    "fig10": "PCW gives 2.31x lower decode energy and a 1.96x speed-up over an empty cache, and "
    "the best accuracy among the initial cache states.",
    "mrc": "No such figure in the paper. Each curve is one recorded request stream replayed at "
    "every cache size: where each policy's cache sizes sit on it, and how much more DRAM buys.",
}
DBSC = ("dbsc", "dbsc_pcw")


def _interval(run, metric: str = "accuracy") -> tuple[float, float] | None:
    """The 95 % interval of a run's score, from its number of documents (eval.limit)."""
    n = _number(run.get("eval.limit"))
    return wilson(run[metric] * n, n) if n == n and n > 0 else None


def _against(run, b, matched: bool | None) -> str:
    """How a run's accuracy compares with its matched baseline run's, in words."""
    text = f"accuracy {run['accuracy']:.3f} vs {b['accuracy']:.3f} for {b['series']}"
    if matched is not False:
        return text
    # No baseline run was as accurate as this one: is the gap more than noise?
    ci = _interval(run)
    noise = "" if ci is None else (
        f"; {b['accuracy']:.3f} is {'within' if b['accuracy'] >= ci[0] else 'below'} this "
        f"run's 95 % interval {ci[0]:.3f}-{ci[1]:.3f}")  # fmt: skip
    return f"{text}, the most accurate baseline run (none was as accurate{noise})"


def verdict(kind: str, runs: pd.DataFrame, baseline: str = BASELINE) -> str:
    """What this data says about the paper's claim for figure `kind`: a line per run compared
    (per bit width for Table 1)."""
    fin = finished(runs)
    if kind == "table1":
        return _table1_verdict(table1_cells(fin))
    if kind == "mrc":
        return f"{fin['stream'].nunique() if 'stream' in fin else 0} request streams."
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
    norm = normalise(fin, baseline) if (fin["policy"] == baseline).any() else fin.iloc[0:0]
    ours = norm[norm["policy"].isin(DBSC) & norm["baseline"].notna()] if len(norm) else norm
    if ours.empty:
        return f"needs runs of {baseline} and of {' or '.join(DBSC)} at the same cache sizes."
    base = norm[norm["policy"] == baseline]
    lines, wins = [], 0
    for _, r in ours.sort_values(["cache_size", "series"]).iterrows():
        b, matched = matched_baseline(r, base)
        acc = _against(r, b, matched)
        if kind == "fig8":
            lower = r["miss_rate_refn"] < b["miss_rate_refn"]
            ci = _interval(b)  # a loss of accuracy within the baseline's interval is noise
            wins += lower and (ci is None or r["accuracy"] >= ci[0])
            lines.append(f"{r['series']} at {r['cache']}: miss rate {r['miss_rate_refn']:.3f} vs "
                         f"{b['miss_rate_refn']:.3f} ({'lower' if lower else 'not lower'}), "
                         f"{acc}.")  # fmt: skip
        else:
            wins += r["energy_norm"] < 1 and r["latency_norm"] < 1
            lines.append(f"{r['series']} at {r['cache']}: {1 / r['energy_norm']:.2f}x less "
                         f"energy, {1 / r['latency_norm']:.2f}x faster; {acc}.")  # fmt: skip
    if kind == "fig8":
        head = (f"{wins} of {len(ours)} DBSC runs miss less than their matched baseline, at an "
                "accuracy within its 95 % interval or above.")  # fmt: skip
    else:
        gains = f"{1 / ours['energy_norm'].min():.2f}x / {1 / ours['latency_norm'].min():.2f}x"
        head = (f"{wins} of {len(ours)} DBSC runs decode with less energy and time per token "
                f"than their matched baseline; the largest gains {gains}.")  # fmt: skip
    return "\n".join([head, *lines])


def _table1_verdict(cells: dict) -> str:
    from slicemoe.table1 import MATS

    lines, broken, close = [], 0, 0
    for h, l in MATS:
        amat = cells.get(("AMAT", "amat", h, l, l))
        base_asym = cells.get(("Asym", "base", h, l, l))
        if amat is None:
            continue
        parts = [f"MAT{h}{l} {l}-bit path: AMAT {amat:.4g}"]
        for quantizer in ("Asym", "Sym"):
            base = cells.get((quantizer, "base", h, l, l))
            if base is not None:
                parts.append(f"{quantizer} Base {base:.4g} (AMAT {amat / base:.2f}x)")
        trunc = [cells[k] for k in (("Asym", "trunc", h, l, l), ("Sym", "trunc", h, l, l))
                 if k in cells]  # fmt: skip
        if trunc:
            parts.append(f"Trunc {min(trunc):.4g} or worse ({min(trunc) / amat:.0f}x AMAT)")
        lines.append(", ".join(parts) + ".")
        broken += bool(trunc) and min(trunc) >= 10 * amat
        close += base_asym is not None and amat <= 1.1 * base_asym
    if not lines:
        return "needs low-path runs of AMAT (bits.scheme=amat, policy=lru_lowbit)."
    head = (f"At {broken} of {len(lines)} bit widths Trunc's low path is at least 10x AMAT's "
            f"perplexity; at {close} AMAT is within 10 % of Asym Base or better.")  # fmt: skip
    return "\n".join([head, *lines])


RUN_COLUMNS = [
    "run", "policy", "policy.lam", "bits", "bits.symmetric", "bits.scheme", "cache",
    "policy.warmup", "accuracy", "perplexity", "eval.limit", "miss_rate_refn",
    "energy_decode_j_per_token", "latency_decode_s_per_token", "run_id",
]  # fmt: skip


@dataclass
class Section:
    """One figure or table of the report: `make()` returns the matplotlib figure, or for
    `table1` the cells (`table1_cells`)."""

    name: str  # the file it is written to
    kind: str  # a key of CLAIMS
    desc: str  # the setting it belongs to
    runs: pd.DataFrame  # every run behind it
    make: Callable[[], Any]


def sections(
    df: pd.DataFrame,
    baseline: str = BASELINE,
    steps: dict | None = None,
    curves: dict | None = None,
) -> list[Section]:
    """Every figure and table for the settings of `df` (`settings`); a file name that comes
    again (another setting, another warmup group) is numbered from its second on. `steps`: run
    id -> miss_rate_step curve (warmup figures); `curves`: run id -> the miss-ratio curve table
    of the stream it recorded."""
    from collections import Counter

    from slicemoe.eval import get_task

    seen: Counter = Counter()

    def name(stem: str, ext: str = "png") -> str:
        seen[stem] += 1
        return f"{stem}{'' if seen[stem] == 1 else f'_{seen[stem]}'}.{ext}"

    out = []
    for desc, group in settings(df):
        if get_task(str(group["task"].iloc[0])).kind == "loglik":
            out.append(Section(name("table1", "md"), "table1", desc, group,
                               lambda g=group: table1_cells(g)))  # fmt: skip
            continue
        kept, folded = main_warmups(group)
        note = f"{desc} ({folded} runs of other warmups: see the warmup figure)" if folded else desc
        out += [
            Section(name("accuracy_vs_miss_rate"), "fig8", note, kept,
                    lambda g=kept, d=note: plot_accuracy_vs_miss_rate(g, title=d)),
            Section(name("energy_latency"), "fig9", note, kept,
                    lambda g=kept: plot_energy_latency(g, baseline)),
        ]  # fmt: skip
        out += [
            Section(name("warmup"), "fig10", desc, runs, lambda r=runs: plot_warmup(r, steps or {}))
            for runs in warmup_groups(group)
        ]
        out.append(Section(name("miss_ratio_curves"), "mrc", desc, group,
                           lambda g=group, d=desc: plot_miss_ratio_curves(g, curves or {}, d)))  # fmt: skip
    return out


def write_html(
    out: Path, title: str, summary: str, written: list[tuple[Section, Any]], baseline: str
) -> Path:
    """A self-contained `index.html`: per figure or table (each with what its `make` made), the
    paper's claim, what the data says, the figure (embedded) or table, and every run behind it."""
    import base64
    import html

    parts = [f"<h1>{html.escape(title)}</h1><pre>{html.escape(summary)}</pre>"]
    for s, made in written:
        if s.kind == "table1":
            body = table1_frame(made).to_html(index=False, na_rep="-", float_format="%.4g")
            if "fp" in made:
                body += f"<p>unquantized experts: {made['fp']:.4g}</p>"
        else:
            image = base64.b64encode((out / s.name).read_bytes()).decode()
            body = f'<img alt="{html.escape(s.name)}" src="data:image/png;base64,{image}">'
        lines = "".join(
            f"<li>{html.escape(line)}</li>"
            for line in verdict(s.kind, s.runs, baseline).splitlines()
        )
        columns = [c for c in RUN_COLUMNS if c in s.runs and s.runs[c].notna().any()]
        table = s.runs[columns].to_html(index=False, float_format="%.4g")
        parts.append(
            f"<h2>{html.escape(s.name)}{' - ' + html.escape(s.desc) if s.desc else ''}</h2>"
            f"<p><b>Paper:</b> {html.escape(CLAIMS[s.kind])}</p>"
            f"<p><b>This data:</b></p><ul>{lines}</ul>{body}"
            f"<details><summary>the {len(s.runs)} runs behind it</summary>{table}</details>"
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
    curves: dict | None = None,
    title: str = "slicemoe report",
) -> list[Path]:
    """runs.csv, every section (`sections`) as a file, and index.html with all of them; what
    was grouped and left out goes to stderr and to the page."""
    import matplotlib.pyplot as plt

    from slicemoe.table1 import format_table

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "runs.csv"]
    df.to_csv(paths[0], index=False)
    summary = describe(df, settings(df))
    print(summary, file=sys.stderr)
    if finished(df).empty:
        print("no finished runs: wrote runs.csv only", file=sys.stderr)
        return paths
    written = []
    for s in sections(df, baseline, steps, curves):
        try:
            made = s.make()
        except ValueError as err:
            print(f"{s.name} skipped: {err}", file=sys.stderr)
            continue
        if s.kind == "table1":
            csv = out / s.name.replace(".md", ".csv")
            (out / s.name).write_text(format_table(made) + "\n")
            table1_frame(made).to_csv(csv, index=False)
            paths += [out / s.name, csv]
        else:
            made.savefig(out / s.name, dpi=110)
            plt.close(made)
            paths.append(out / s.name)
        written.append((s, made))
    paths.append(write_html(out, title, summary, written, baseline))
    return paths


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


def curves_of(df: pd.DataFrame) -> tuple[dict, dict]:
    """The per-step miss rates of the warmup comparisons' runs and the miss-ratio curves of
    the runs that recorded a stream: the curves `sections` draws, from the tracking store."""
    from slicemoe.eval import get_task

    warm = [g for _, s in settings(df) for g in warmup_groups(s)]
    steps = step_curves(pd.concat(warm)["run_id"]) if warm else {}
    recorded = finished(df)
    if "stream_source" in recorded:
        # as `sections`: text runs (Table 1) show no miss-ratio curves
        texts = recorded["task"].map(lambda t: get_task(str(t)).kind == "loglik")
        recorded = recorded[(recorded["stream_source"] == "recorded") & ~texts]
        return steps, miss_ratio_curves(recorded["run_id"])
    return steps, {}


def parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    args = parser().parse_args(argv)
    runs = search(args.experiment, args.tracking_uri)
    if args.parent:
        runs = runs[runs["run_id"].isin(sweep_run_ids(args.parent))]
    df = tidy(runs)
    steps, curves = curves_of(df)
    out = args.out or Path("report") / args.experiment
    title = f"slicemoe: {args.experiment}"
    for path in write_report(df, out, args.baseline, steps, curves, title):
        print(path)


if __name__ == "__main__":
    main()
