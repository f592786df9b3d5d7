"""sweep.report.page: the sections of a report, the files written and index.html."""

from __future__ import annotations

import pandas as pd
from report_tables import (
    CURVE,
    lam_rows,
    optimality_rows,
    report_rows,
    stream_rows,
    table1_rows,
    warmup_rows,
)

from sweep.report import page, verdict


def test_the_report_writes_the_figures_of_matched_baselines(tmp_path):
    written = {p.name for p in page.write_report(lam_rows(), tmp_path)}
    assert {"accuracy_vs_miss_rate.png", "energy_latency.png", "index.html"} <= written


def test_report_never_puts_runs_of_different_settings_in_one_figure(tmp_path, capsys):
    df = pd.DataFrame(report_rows() + report_rows(**{"eval.limit": 10, "model.device": "cuda"}))
    written = {p.name for p in page.write_report(df, tmp_path)}
    assert {"accuracy_vs_miss_rate.png", "accuracy_vs_miss_rate_2.png"} <= written
    assert {"energy_latency.png", "energy_latency_2.png"} <= written
    err = capsys.readouterr().err
    assert "2 settings that must not share a figure" in err and "eval.limit=10 (4 runs)" in err


def test_report_draws_the_warmup_comparison_for_runs_that_differ_only_in_warmup(tmp_path):
    rows = warmup_rows()
    steps = {r["run_id"]: [0.9, 0.5, 0.2] for r in rows}
    written = {p.name for p in page.write_report(pd.DataFrame(rows), tmp_path, steps=steps)}
    assert {"warmup.png", "warmup_2.png", "warmup_3.png", "warmup_4.png"} <= written


def test_figs_8_and_9_leave_other_warmups_to_the_warmup_figure():
    lru = [r | {"policy.warmup": "lru"} for r in report_rows()]
    extra = [lru[3] | {"policy.warmup": w} for w in ("empty", "pcw")]  # dbsc at frac_50
    names = [s.name for s in page.sections(pd.DataFrame(lru + extra))]
    assert names == [
        "accuracy_vs_miss_rate.png", "energy_latency.png", "warmup.png", "miss_ratio_curves.png"
    ]  # fmt: skip


def test_the_optimality_figure_comes_with_runs_set_beside_belady(tmp_path):
    written = {p.name: p for p in page.write_report(pd.DataFrame(optimality_rows()), tmp_path)}
    assert "optimality_gap.png" in written
    assert verdict.CLAIMS["optimality"][:40] in written["index.html"].read_text()


def test_table1_files_and_page_from_perplexity_runs(tmp_path):
    written = {p.name: p for p in page.write_report(table1_rows(), tmp_path)}
    assert {"table1.md", "table1.csv", "index.html"} <= set(written)
    assert not {"accuracy_vs_miss_rate.png", "energy_latency.png"} & set(written)
    md = written["table1.md"].read_text()
    assert "| Asym | trunc | 4.04 | 500 | - | - | 4.08 | 500 |" in md
    assert "unquantized experts: 3.9" in md
    csv = pd.read_csv(written["table1.csv"])
    assert list(csv.columns[:4]) == ["quant", "scheme", "MAT42 4b", "MAT42 2b"] and len(csv) == 5
    html = written["index.html"].read_text()
    assert verdict.CLAIMS["table1"][:40] in html and "<td>500.02</td>" not in html
    # Beside the figures' runs, each file keeps its plain name: numbers are for repeats.
    both = pd.concat([pd.DataFrame(report_rows()), table1_rows()])
    names = [s.name for s in page.sections(both)]
    assert names[0] == "accuracy_vs_miss_rate.png" and "table1.md" in names


def test_miss_ratio_curves_figure_or_why_not(tmp_path, capsys):
    written = {
        p.name
        for p in page.write_report(pd.DataFrame(stream_rows()), tmp_path, curves={"r0": CURVE})
    }
    assert "miss_ratio_curves.png" in written
    page.write_report(pd.DataFrame(stream_rows()), tmp_path / "none")
    assert (
        "miss_ratio_curves.png skipped: no run of this setting recorded a stream"
        in capsys.readouterr().err
    )


def test_report_html_puts_each_figure_next_to_the_paper_claim_and_what_the_data_says(tmp_path):
    df = pd.DataFrame(report_rows())
    html = [p for p in page.write_report(df, tmp_path) if p.name == "index.html"][0].read_text()
    for name in ("accuracy_vs_miss_rate.png", "energy_latency.png"):
        assert name in html
    assert verdict.CLAIMS["fig9"].split(",")[0] in html and "data:image/png;base64," in html
    assert verdict.verdict("fig9", df).splitlines()[0] in html


def test_the_page_says_what_each_figure_makes_of_the_fields_its_runs_differ_in(tmp_path):
    lru = report_rows(eviction="lru")
    df = pd.DataFrame(lru + [r | {"eviction": "fifo"} for r in lru])
    fig8, fig9 = page.sections(df)[:2]
    assert (
        fig8.differ == fig9.differ
        and "; cache.eviction (a line each where it varies" in fig8.differ
    )
    html = page.write_report(df, tmp_path)[-1].read_text()
    assert html.count("<b>Runs differ in:</b> policy.name (a line each") == 2
    assert html.count("dbsc eviction=fifo at frac_25: 2.00x less energy") == 1


def test_tau_swept_in_fig10_gives_a_warmup_figure_and_verdict_per_tau(tmp_path):
    rows = [r for r in warmup_rows() if r["policy"] == "dbsc" and r["cache"] == "frac_25"]
    rows += [r | {"run_id": r["run_id"] + "t", "policy.tau": 0.3} for r in rows]
    df = pd.DataFrame(rows)
    warm = [s for s in page.sections(df) if s.kind == "fig10"]
    assert [s.desc for s in warm] == [
        "dbsc mat84 frac_25 policy.tau=0.3", "dbsc mat84 frac_25 policy.tau=0.5"
    ]  # fmt: skip
    assert all(s.verdict().startswith("PCW: 1.00x lower decode energy") for s in warm)
    written = {p.name: p for p in page.write_report(df, tmp_path)}
    assert {"warmup.png", "warmup_2.png"} <= set(written)
    assert written["index.html"].read_text().count("PCW: 1.00x lower decode energy") == 2


def test_the_report_s_miss_rate_and_baseline_reach_every_verdict(tmp_path):
    df = pd.DataFrame(report_rows()).assign(
        miss_rate_refn=[0.3, 0.3, 0.1, 0.1], correct=[[1, 0]] * 4
    )
    fig8 = page.sections(df, miss_rate="miss_rate_refn")[0]
    assert fig8.verdict().startswith("2 of 2 DBSC runs miss less (miss_rate_refn)")
    assert page.sections(df, baseline="lru_lowbit")[1].verdict() == (
        "needs runs of lru_lowbit and of dbsc or dbsc_pcw at the same cache sizes."
    )
    written = {p.name: p for p in page.write_report(df, tmp_path, miss_rate="miss_rate_refn")}
    assert "miss_rate_refn 0.100 vs 0.300 (lower)" in written["index.html"].read_text()
    # The per-problem results are not a column of runs.csv.
    assert "correct" not in pd.read_csv(written["runs.csv"]).columns
