"""The report's figures: accuracy against miss rate (Fig. 8), energy and latency against the
matched baseline (Fig. 9), warmups (Fig. 10), miss-ratio curves and each run's gap to Belady's
oracle. Each takes runs as `tidy` leaves them and returns a matplotlib figure."""

from __future__ import annotations

import itertools
import math

import pandas as pd

from sweep.report.compare import BASELINE, MISS_RATE, interval, normalise, pareto
from sweep.report.group import cache_label, series_label
from sweep.report.read import finished

MARKERS = "osD^vP*Xh<>p"
# Where place_labels tries a label: rings of offsets (points) from its point, in 16 directions
# (the diagonals first).
LABEL_RINGS = (8, 14, 22, 32, 44, 58, 75, 95, 120, 150)
LABEL_DIRECTIONS = sorted(
    ((round(math.cos(a), 3), round(math.sin(a), 3)) for a in (i * math.pi / 8 for i in range(16))),
    key=lambda d: abs(abs(d[0]) - abs(d[1])),
)


def _wrap(title: str, width: int = 95) -> str:
    import textwrap

    return "\n".join(textwrap.fill(line, width) for line in title.strip().splitlines())


def _miss_rate_label(metric: str) -> str:
    from slicemoe.metrics import DOCS

    return _wrap(f"{metric}: {DOCS[metric]}", 100)


def plot_accuracy_vs_miss_rate(
    df: pd.DataFrame,
    metric: str = "accuracy",
    title: str = "",
    x: str = MISS_RATE,
    baseline: str = BASELINE,
):
    """One setting's runs (see `settings`): `metric` against the miss rate `x` (by default the
    paper's high-bit-normalised one), a marker per policy, a line per series through its cache
    sizes in size order, each point labelled with its cache and `metric` (labels placed apart,
    `place_labels`), 95 % intervals from the number of documents, and the Pareto front. A run
    less accurate than the `baseline` run it is matched with (sweep.report.compare.normalise)
    is drawn hollow and grey-labelled."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    fin = finished(df).reset_index(drop=True)
    fin = fin.assign(series=series_label(fin), below=_below_baseline(fin, baseline, x))
    policies = sorted(fin["policy"].unique())
    fig, ax = plt.subplots(figsize=(10, 5))
    points, labels, colours = [], [], []
    for i, (label, group) in enumerate(sorted(fin.groupby("series"), key=lambda kv: kv[0])):
        group = group.sort_values("cache_size")
        p = policies.index(group["policy"].iloc[0])
        marker, size, colour = MARKERS[p % len(MARKERS)], 8 - 0.8 * (p % 4), f"C{i % 10}"
        yerr = None
        intervals = [interval(run, metric) for _, run in group.iterrows()]
        if metric.startswith("accuracy") and None not in intervals:
            lo, hi = (pd.Series(v, index=group.index) for v in zip(*intervals))
            yerr = [group[metric] - lo, hi - group[metric]]
        # Sizes differ by policy, so that a policy drawn over another one still shows.
        ax.errorbar(group[x], group[metric], yerr=yerr, marker=marker, markersize=size,
                    color=colour, capsize=3, alpha=0.85, label=label, zorder=3 + i)  # fmt: skip
        below = group[group["below"]]  # hollow, over errorbar's markers (its zorder + 0.1)
        ax.plot(below[x], below[metric], linestyle="none", marker=marker, markersize=size,
                markerfacecolor="white", markeredgecolor="0.45", zorder=3.2 + i)  # fmt: skip
        for _, row in group.iterrows():
            name = str(row["cache"])
            cache = name.replace("frac_", "") + ("%" if name.startswith("frac_") else "")
            points.append((row[x], row[metric]))
            labels.append(f"{cache}: {row[metric]:.3f}")
            colours.append("0.45" if row["below"] else colour)
    front = pareto(fin, x, metric)
    ax.step(front[x], front[metric], where="post", color="gray", linestyle=":", linewidth=1,
            label="Pareto front", zorder=1)  # fmt: skip
    handles, _ = ax.get_legend_handles_labels()
    if fin["below"].any():
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="white",
                              markeredgecolor="0.45",
                              label=f"less accurate than the {baseline} run it is matched with"))  # fmt: skip
    ax.set_xlabel(_miss_rate_label(x), fontsize=8)
    ax.set_ylabel(metric)
    n = pd.to_numeric(fin["eval.limit"], errors="coerce") if "eval.limit" in fin else None
    docs = f", n = {int(n.iloc[0])} documents per point, 95 % Wilson intervals" if (
        n is not None and n.notna().all() and n.nunique() == 1) else ""  # fmt: skip
    ax.set_title(_wrap(f"{metric} vs miss rate{docs}; labels: cache, {metric}\n{title}", 110),
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.margins(0.1)
    legend = ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1),
                       borderaxespad=0)  # fmt: skip
    fig.tight_layout()
    place_labels(ax, points, labels, colours, avoid=[legend])
    return fig


def _below_baseline(fin: pd.DataFrame, baseline: str, by: str) -> pd.Series:
    """Per run (not the baseline's own): whether it is less accurate than the baseline run it
    is matched with; False where there is no accuracy or no baseline run to match."""
    false = pd.Series(False, index=fin.index)
    if "accuracy" not in fin or not (fin["policy"] == baseline).any():
        return false
    norm = normalise(fin, baseline, by)
    return (norm["accuracy"] < norm["accuracy_base"]) & (fin["policy"] != baseline)


def place_labels(ax, points, labels, colours, avoid=(), fontsize: float = 7) -> None:
    """Each label beside its point (data coordinates) at the first spot where its box overlaps
    no label placed before, no point and nothing of `avoid` (e.g. the legend): on rings around
    the point inside the axes (from the second ring on, a thin line leads back to the point),
    else in a column right of the axes, below `avoid`, as far down as it takes. So labels never
    overlap. Call it last: the boxes are measured on the figure as laid out."""
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    inner = ax.get_window_extent(renderer)
    half = 5 * fig.dpi / 72  # a marker's half width, with room, in pixels
    taken = [
        Bbox.from_extents(px - half, py - half, px + half, py + half)
        for px, py in (ax.transData.transform(points) if len(points) else [])
    ]
    taken += [artist.get_window_extent(renderer) for artist in avoid]
    # The column in figure fractions: saved at another dpi, pixels would move.
    right = (inner.x1 + half) / fig.bbox.width
    top = min((b.y0 for b in taken[len(points) :]), default=inner.y1) / fig.bbox.height

    def spots():
        for ring, radius in enumerate(LABEL_RINGS):
            for dx, dy in LABEL_DIRECTIONS:
                yield (dx * radius, dy * radius), "offset points", dx, dy, ring > 0
        for step in itertools.count(1):
            yield (right, top - 0.005 * step), "figure fraction", 1, -1, True

    def side(d: float) -> int:
        return 0 if abs(d) < 0.3 else 1 if d > 0 else -1

    def fits(box, coords: str) -> bool:
        inside = (
            inner.x0 <= box.x0 and box.x1 <= inner.x1 and inner.y0 <= box.y0 <= box.y1 <= inner.y1
        )
        return (inside or coords != "offset points") and not any(box.overlaps(t) for t in taken)

    for point, label, colour in zip(points, labels, colours):
        for xytext, coords, dx, dy, lead in spots():
            ann = ax.annotate(
                label, point, xytext=xytext, textcoords=coords, fontsize=fontsize, color=colour,
                ha={1: "left", -1: "right", 0: "center"}[side(dx)],
                va={1: "bottom", -1: "top", 0: "center"}[side(dy)], annotation_clip=False,
                arrowprops=dict(arrowstyle="-", color="0.6", linewidth=0.5) if lead else None,
            )  # fmt: skip
            ann.update_positions(renderer)
            box = Text.get_window_extent(ann, renderer)  # the text's, without its line
            if fits(box, coords):
                taken.append(box)
                break
            ann.remove()


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
    baseline run (sweep.report.compare.normalise), each bar labelled with the run's accuracy and
    the baseline run's (and that run's name when the baseline ran at several settings); a run
    less accurate than its baseline run is greyed and hatched ("//", "xx" where the verdict's
    test tells them apart). Runs without a baseline run to compare with have no bar."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

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
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.2))
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
                below = run["accuracy"] < run["accuracy_base"]
                hatch = "xx" if run["accuracy_sign"] == -1 else "//" if below else None
                ax.bar(x, gain, width, color=f"C{i % 10}", alpha=0.4 if below else 1.0,
                       hatch=hatch, edgecolor="black", linewidth=0.4)  # fmt: skip
                name = run["baseline"].removeprefix(baseline).strip() if several else ""
                ax.annotate(f"{_accuracies(run)} {name}".strip(), (x, gain),
                            textcoords="offset points", xytext=(0, 2), ha="center",
                            va="bottom", rotation=90, fontsize=6,
                            color="0.35" if below else "black")  # fmt: skip
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks([x + width * (len(series) - 1) / 2 for x in range(len(caches))])
        ax.set_xticklabels(caches, fontsize=8)
        ax.set_xlabel("cache size")
        ax.set_ylabel(f"{title}: {baseline} / run")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, 1.5 * max(ax.get_ylim()[1], 1.0))  # room above the bars for their labels
    handles = [Patch(color=f"C{i % 10}", label=label) for i, label in enumerate(series)]
    handles += [
        Patch(facecolor="0.85", edgecolor="black", hatch="//",
              label=f"less accurate than its {baseline} run"),
        Patch(facecolor="0.85", edgecolor="black", hatch="xx",
              label="less accurate by the verdict's test"),
    ]  # fmt: skip
    axes[1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(
        f"Each bar: the run against the cheapest {baseline} run at its cache size that is at "
        "least as accurate (the most accurate one where none is), labelled with the run's\n"
        "accuracy against that run's; greyed and //: the run is less accurate, xx: less "
        "accurate by the verdict's test, so the gain was bought with accuracy",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


def _accuracies(run) -> str:
    """A run's accuracy against its baseline run's, e.g. "acc 0.620 vs 0.650"."""
    return f"acc {run['accuracy']:.3f} vs {run['accuracy_base']:.3f}"


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
