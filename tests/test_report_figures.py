"""sweep.report.figures: each figure draws from runs as `tidy` leaves them."""

from __future__ import annotations

import itertools

import matplotlib
import pandas as pd
import pytest
from matplotlib.text import Text
from report_tables import (
    CURVE,
    lam_rows,
    optimality_rows,
    report_rows,
    stream_rows,
    warmup_rows,
)

from sweep.report import figures

matplotlib.use("Agg")


def test_miss_ratio_curves_put_each_stream_and_its_runs_on_one_figure():
    found = figures.streams(pd.DataFrame(stream_rows()), {"r0": CURVE})
    assert [(label, len(members)) for label, _, members in found] == [
        ("cache_prior_highbit mat84", 2)
    ]
    assert figures.plot_miss_ratio_curves(pd.DataFrame(stream_rows()), {"r0": CURVE}).axes
    with pytest.raises(ValueError, match="no run of this setting recorded a stream"):
        figures.plot_miss_ratio_curves(pd.DataFrame(stream_rows()), {})


def test_figures_draw_every_run():
    fig8 = figures.plot_accuracy_vs_miss_rate(pd.DataFrame(report_rows()))
    # Two policies, each a line through its two cache sizes, and the Pareto front.
    assert len(fig8.axes[0].get_lines()) >= 3
    fig9 = figures.plot_energy_latency(lam_rows())
    assert len(fig9.axes[0].patches) == 3  # dbsc, dbsc_pcw and lru_lowbit against the baseline
    rows = warmup_rows()
    fig10 = figures.plot_warmup(pd.DataFrame(rows[:1] + rows[4:5]), {"r0": [0.9, 0.5, 0.2]})
    assert len(fig10.axes[0].get_lines()) == 1  # the one run with a step curve
    with pytest.raises(ValueError, match="only cache_prior_highbit runs"):
        figures.plot_energy_latency(pd.DataFrame(report_rows()[:2]))


def test_fig8_plots_the_high_bit_normalised_miss_rate_unless_told_otherwise():
    # MAT42 runs: per high-bit (4-bit) expert bytes the miss rate is twice that per 8-bit bytes.
    df = pd.DataFrame(report_rows(bits="mat42")).assign(
        miss_rate_refn=lambda d: d["miss_rate_hbn"] / 2
    )

    def xs(fig):
        ax = fig.axes[0]
        return sorted({round(x, 6) for line in ax.get_lines() for x in line.get_xdata()}), ax

    values, ax = xs(figures.plot_accuracy_vs_miss_rate(df))
    assert values == [0.1, 0.2] and ax.get_xlabel().startswith("miss_rate_hbn: demand Flash bytes")
    values, ax = xs(figures.plot_accuracy_vs_miss_rate(df, x="miss_rate_refn"))
    assert values == [0.05, 0.1] and ax.get_xlabel().startswith("miss_rate_refn:")


def test_fig9_draws_a_bar_per_series_and_cache_bytes():
    # Two runs named frac_25 at other bytes (cache.frac overridden): two bars, not one.
    rows = report_rows()[:1] + report_rows()[2:3]
    rows += [r | {"cache_size": 3e6, "run": r["run"] + " big"} for r in rows]
    fig = figures.plot_energy_latency(pd.DataFrame(rows))
    assert len(fig.axes[0].patches) == 2
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        "frac_25 (1 MB)",
        "frac_25 (3 MB)",
    ]


def crowded_rows() -> pd.DataFrame:
    """Five policies at five cache sizes, their points close together; lru_lowbit is less
    accurate than the baseline at every size."""
    rows = []
    for p, (policy, acc) in enumerate(
        (("cache_prior_highbit", 0.6), ("dbsc", 0.62), ("lru_lowbit", 0.4), ("lru_highbit", 0.6),
         ("dbsc_pcw", 0.61))
    ):  # fmt: skip
        for i, size in enumerate((1, 1.5, 2, 2.5, 5)):
            rows.append(report_rows()[0] | dict(
                run=f"{policy} {i}", policy=policy, cache=f"frac_{10 * i + 10}", cache_size=size * 1e6,
                accuracy=acc + 0.01 * i, miss_rate_hbn=0.3 - 0.02 * i + 0.001 * p,
            ))  # fmt: skip
    return pd.DataFrame(rows)


def test_fig8_labels_every_point_with_its_accuracy_apart_and_marks_runs_below_the_baseline():
    fig = figures.plot_accuracy_vs_miss_rate(crowded_rows())
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text()]
    assert len(texts) == 25
    assert {t.get_text() for t in texts} >= {"10%: 0.400", "50%: 0.660"}
    renderer = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(t, renderer) for t in texts]
    assert not [(a, b) for a, b in itertools.combinations(boxes, 2) if a.overlaps(b)]
    # lru_lowbit's five points hollow, grey-labelled, and said so in the legend.
    hollow = [line for line in ax.get_lines() if line.get_markerfacecolor() == "white"]
    assert sum(len(line.get_xdata()) for line in hollow) == 5
    assert sum(t.get_color() == "0.45" for t in texts) == 5
    assert any("less accurate than the cache_prior_highbit run" in t.get_text()
               for t in ax.get_legend().get_texts())  # fmt: skip


def test_fig9_labels_every_bar_with_both_accuracies_and_hatches_the_less_accurate():
    fig = figures.plot_energy_latency(lam_rows())
    ax = fig.axes[0]
    labels = sorted(t.get_text() for t in ax.texts)
    # dbsc and dbsc_pcw against as accurate baseline runs; lru_lowbit against the most
    # accurate one there is (less accurate than every baseline run).
    assert labels == ["acc 0.200 vs 0.300 lam=0.5", "acc 0.700 vs 0.700 lam=0.2",
                      "acc 0.800 vs 0.750 lam=0.05"]  # fmt: skip
    hatches = {round(1 / bar.get_height(), 3): bar.get_hatch() for bar in ax.patches}
    assert hatches == {0.5: None, 0.333: None, 1.0: "//"}  # lru_lowbit: as costly, less accurate
    legend = [t.get_text() for t in fig.axes[1].get_legend().get_texts()]
    assert "less accurate than its cache_prior_highbit run" in legend


def test_optimality_gap_draws_each_replayed_run_against_belady():
    from sweep.report.verdict import verdict

    df = pd.DataFrame(optimality_rows())
    ax = figures.plot_optimality_gap(df).axes[0]
    # Six replayed runs: a bar each and Belady's line across it; the in-loop run has none.
    assert len(ax.patches) == 6 and len(ax.collections) == 6
    assert [t.get_text() for t in ax.get_xticklabels()] == ["frac_25", "frac_50"]
    assert sorted(t.get_text() for t in ax.texts)[-1] == "+0.080"
    assert verdict("optimality", df).splitlines() == [
        "frac_25: Belady 0.100; closest to farthest: dbsc eviction=belady +0.000, "
        "dbsc eviction=lru +0.050, dbsc eviction=fifo +0.080.",
        "frac_50: Belady 0.040; closest to farthest: dbsc eviction=belady +0.000, "
        "dbsc eviction=lru +0.050, dbsc eviction=fifo +0.080.",
    ]
    with pytest.raises(ValueError, match="no run has belady_miss_rate"):
        figures.plot_optimality_gap(pd.DataFrame(report_rows()))
