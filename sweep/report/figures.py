"""The report's figures: accuracy against miss rate (Fig. 8), energy and latency against the
matched baseline (Fig. 9), warmups (Fig. 10), miss-ratio curves and each run's gap to Belady's
oracle. Each takes runs as `tidy` leaves them and returns a matplotlib figure."""

from __future__ import annotations

import pandas as pd

from sweep.report.compare import BASELINE, MISS_RATE, interval, normalise, pareto
from sweep.report.group import cache_label, series_label
from sweep.report.read import finished

MARKERS = "osD^vP*Xh<>p"


def _wrap(title: str, width: int = 95) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in title.strip().splitlines())


def _miss_rate_label(metric: str) -> str:
    from slicemoe.metrics import DOCS

    return _wrap(f"{metric}: {DOCS[metric]}", 100)


def plot_accuracy_vs_miss_rate(
    df: pd.DataFrame, metric: str = "accuracy", title: str = "", x: str = MISS_RATE
):
    """One setting's runs (see `settings`): `metric` against the miss rate `x` (by default the
    paper's high-bit-normalised one), a marker per policy, a line per series through its cache
    sizes in size order, each point labelled with its cache, 95 % intervals from the number of
    documents, and the Pareto front."""
    import matplotlib.pyplot as plt

    fin = finished(df).assign(series=lambda d: series_label(d))
    policies = sorted(fin["policy"].unique())
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (label, group) in enumerate(sorted(fin.groupby("series"), key=lambda kv: kv[0])):
        group = group.sort_values("cache_size")
        p = policies.index(group["policy"].iloc[0])
        yerr = None
        intervals = [interval(run, metric) for _, run in group.iterrows()]
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
    ax.set_xlabel(_miss_rate_label(x), fontsize=8)
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


def plot_miss_ratio_curves(runs: pd.DataFrame, curves: dict, title: str = "", y: str = MISS_RATE):
    """Every recorded stream's miss rate `y` against the cache size (one model pass replayed at
    each size; the 8-bit-normalised one where the curves have no `y`), and the sweep's runs of
    that stream as points on it."""
    import matplotlib.pyplot as plt

    found = streams(finished(runs), curves)
    if not found:
        raise ValueError("no run of this setting recorded a stream with a miss-ratio curve")
    y = y if all(y in table for _, table, _ in found) else "miss_rate_refn"
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, (label, table, members) in enumerate(found):
        ax.plot(table["cache_capacity_bytes"] / 1e6, table[y], color=f"C{i % 10}", linewidth=1.2,
                label=label)  # fmt: skip
        ax.plot(members["cache_size"] / 1e6, members[y], "o", color=f"C{i % 10}", markersize=5)
    ax.set_xlabel("cache capacity for routed experts (MB)")
    ax.set_ylabel(_miss_rate_label(y), fontsize=7)
    ax.set_ylim(bottom=0)
    ax.set_title(_wrap(f"miss-ratio curve per request stream (points: the sweep's runs)\n{title}"),
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def optimality_runs(df: pd.DataFrame) -> pd.DataFrame:
    """The finished runs that were set beside Belady's oracle (slicemoe.optimality), with their
    series and cache labels."""
    fin = finished(df)
    if "belady_miss_rate" in fin:
        fin = fin[fin["belady_miss_rate"].notna()]
    if "belady_miss_rate" not in fin or fin.empty:
        raise ValueError("no run has belady_miss_rate (a replayed run logs it)")
    return fin.assign(series=series_label(fin), at=cache_label(fin))


def plot_optimality_gap(df: pd.DataFrame, title: str = ""):
    """Per cache size, each series' decode slice miss rate (a bar) and Belady's oracle on the
    same request stream at the same DRAM bytes (the black line across it): the bar above the
    line, labelled, is the run's gap to the optimum."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    runs = optimality_runs(df)
    size = "cache_size" if "cache_size" in runs else "cache"
    caches = runs.sort_values(size)["at"].drop_duplicates().tolist()
    series = sorted(runs["series"].unique())
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(7.5, 1.2 + 0.35 * len(series) * len(caches)), 4.8))
    for i, label in enumerate(series):
        for j, cache in enumerate(caches):
            at = runs[(runs["series"] == label) & (runs["at"] == cache)]
            if at.empty:
                continue
            run = at.iloc[0]  # series and cache tell runs apart, but for where they ran
            x = j + (i - (len(series) - 1) / 2) * width
            ax.bar(x, run["miss_rate"], width, color=f"C{i % 10}", edgecolor="black",
                   linewidth=0.4)  # fmt: skip
            ax.hlines(run["belady_miss_rate"], x - width / 2, x + width / 2, color="black",
                      linewidth=2)  # fmt: skip
            ax.annotate(f"+{run['miss_rate'] - run['belady_miss_rate']:.3f}",
                        (x, run["miss_rate"]), textcoords="offset points", xytext=(0, 2),
                        ha="center", rotation=90, fontsize=6)  # fmt: skip
    ax.set_xticks(range(len(caches)))
    ax.set_xticklabels(caches, fontsize=8)
    ax.set_xlabel("cache size")
    ax.set_ylabel("decode slice miss rate (all decode steps)")
    ax.set_ylim(0, runs["miss_rate"].max() * 1.2)
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=f"C{i % 10}", label=label) for i, label in enumerate(series)]
    handles.append(
        Line2D([], [], color="black", linewidth=2, label="Belady, same stream and bytes")
    )
    ax.legend(handles=handles, fontsize=7, ncol=2)
    ax.set_title(_wrap(f"miss rate against Belady's oracle (label: the gap)\n{title}"), fontsize=9)
    fig.tight_layout()
    return fig


def plot_energy_latency(df: pd.DataFrame, baseline: str = BASELINE):
    """Per cache size and series, the decode energy gain and speed-up per token over the matched
    baseline run (sweep.report.compare.normalise: named above each bar when the baseline ran at
    several settings; hatched: no baseline run was as accurate, or less accurate than it). Runs
    without a baseline run to compare with have no bar."""
    import matplotlib.pyplot as plt

    norm = normalise(df, baseline)
    several = norm.loc[norm["policy"] == baseline, "series"].nunique() > 1
    norm = norm[norm["policy"] != baseline]
    if norm.empty:
        raise ValueError(f"only {baseline} runs: nothing to compare with it")
    norm = norm[norm["baseline"].notna()]
    if norm.empty:
        raise ValueError(f"no run has a {baseline} run to compare with")
    size = "cache_size" if "cache_size" in norm else "cache"
    caches = norm.sort_values(size)["at"].drop_duplicates().tolist()
    series = sorted(norm["series"].unique())
    width = 0.8 / len(series)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, column, title in (
        (axes[0], "energy_norm", "decode energy gain per token"),
        (axes[1], "latency_norm", "decode speed-up per token"),
    ):
        for i, label in enumerate(series):
            for j, cache in enumerate(caches):
                runs = norm[(norm["series"] == label) & (norm["at"] == cache)]
                if runs.empty:
                    continue
                run = runs.iloc[0]  # series and cache tell runs apart, but for where they ran
                x, gain = j + i * width, 1 / run[column]
                hatch = "xx" if run["accuracy_sign"] == -1 else "//" if run["beyond"] else None
                ax.bar(x, gain, width, color=f"C{i % 10}", hatch=hatch, edgecolor="black",
                       linewidth=0.4)  # fmt: skip
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
    handles += [
        Patch(
            facecolor="white", edgecolor="black", hatch="//", label="no baseline run as accurate"
        ),
        Patch(facecolor="white", edgecolor="black", hatch="xx", label="less accurate (a test)"),
    ]
    axes[0].legend(handles=handles, fontsize=7)
    fig.suptitle(
        f"Each bar: the run against the cheapest {baseline} run at its cache size that is at "
        "least as accurate (named above the bar); //: no baseline run was as accurate, so the\n"
        "most accurate one; xx: the run is less accurate than that baseline run by the "
        "verdict's test, so the gain was bought with accuracy",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


def plot_warmup(runs: pd.DataFrame, steps: dict, title: str = "", window: int = 5):
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
    right.set_title(_wrap(f"{title}: decode cost"), fontsize=9)
    right.grid(axis="y", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    return fig
