"""sweep.report.figures: each figure draws from runs as `tidy` leaves them."""

from __future__ import annotations

import matplotlib
import pandas as pd
import pytest
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
