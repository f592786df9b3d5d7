"""sweep.report.verdict: what the runs say of each of the paper's claims."""

from __future__ import annotations

import pandas as pd
from report_tables import lam_rows, report_rows, table1_rows

from sweep.report import verdict


def test_fig9_verdict_names_the_matched_baseline_run_and_the_accuracy_gap():
    text = verdict.verdict("fig9", lam_rows())
    cp = "cache_prior_highbit lam="
    assert text.startswith("1 of 2 DBSC runs decode with less energy and time per token")
    assert (
        f"dbsc at frac_25: 2.00x less energy, 1.00x faster; accuracy 0.700 vs 0.700 for {cp}0.2."
        in text
    )
    assert (
        f"0.800 vs 0.750 for {cp}0.05, the most accurate baseline run (none was as accurate" in text
    )
    assert "0.750 is within this run's 95 % interval" in text


def test_verdicts_say_whether_an_accuracy_gap_is_more_than_noise():
    df = pd.DataFrame(report_rows())
    fig9 = verdict.verdict("fig9", df)
    # dbsc: half the baseline's energy per token (1.0 vs 2.0), same latency, more accurate.
    head, first = fig9.splitlines()[:2]
    assert head.startswith("0 of 2 DBSC runs decode with less energy and time per token")
    assert first.startswith("dbsc at frac_25: 2.00x less energy, 1.00x faster; accuracy 0.700 vs")
    assert "none was as accurate; 0.600 is within this run's 95 % interval" in fig9
    better = pd.DataFrame(report_rows(**{"eval.limit": 400}))  # 0.7 +- 0.045 at n=400
    assert "0.600 is below this run's 95 % interval" in verdict.verdict("fig8", better)


def test_table1_verdict_is_table1s():
    text = verdict.verdict("table1", table1_rows())
    assert text.startswith("At 2 of 2 bit widths Trunc's low path is at least 10x AMAT's")
