"""sweep.report.verdict: what the runs say of each of the paper's claims."""

from __future__ import annotations

import pandas as pd
from report_tables import against, lam_rows, report_rows, table1_rows, warmup_rows

from sweep.report import verdict
from sweep.report.compare import PER_TOKEN


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
    # 0.80 and 0.75 of 40 documents: not told apart, so matched (at least as accurate).
    assert "Matched accuracy: 95 % Wilson intervals 0.652-0.895 and 0.598-0.858 overlap" in text
    assert "(n = 40 and 40; no paired per-problem results)" in text


def test_verdicts_say_whether_an_accuracy_gap_is_more_than_noise():
    df = pd.DataFrame(report_rows())
    fig9 = verdict.verdict("fig9", df)
    # dbsc: half the baseline's energy per token (1.0 vs 2.0), same latency, more accurate.
    head, first = fig9.splitlines()[0], fig9.splitlines()[3]
    assert head.startswith("0 of 2 DBSC runs decode with less energy and time per token")
    assert first.startswith("dbsc at frac_25: 2.00x less energy, 1.00x faster; accuracy 0.700 vs")
    assert "(none was as accurate). Matched accuracy: 95 % Wilson intervals" in fig9
    better = pd.DataFrame(report_rows(**{"eval.limit": 400}))  # 0.7 +- 0.045 at n=400
    assert (
        "(none was as accurate). More accurate: 95 % Wilson intervals 0.653-0.743 and "
        "0.551-0.647 do not overlap (n = 400 and 400" in verdict.verdict("fig8", better)
    )


def test_table1_verdict_is_table1s():
    text = verdict.verdict("table1", table1_rows())
    assert text.startswith("At 2 of 2 bit widths Trunc's low path is at least 10x AMAT's")


# --- the verdicts claim only what the numbers support ----------------------------------------

CP = "cache_prior_highbit"


def test_a_saving_bought_with_accuracy_is_no_win_and_is_listed_apart():
    # 0.30 against 0.75 of 40 documents: 1.5x less energy, but far less accurate.
    df = against({"accuracy": 0.30}, {"accuracy": 0.75, "energy_decode_j_per_token": 1.5})
    fig9 = verdict.verdict("fig9", df).splitlines()
    assert fig9[0] == (
        "0 of 1 DBSC runs decode with less energy and time per token than their matched baseline "
        "at matched accuracy."
    )
    assert fig9[1] == verdict.RULE
    assert fig9[2] == (
        "1 DBSC runs saved energy only by losing accuracy (less accurate than their baseline "
        "run): dbsc at frac_25 (1.50x less energy at accuracy 0.300 vs 0.750)."
    )
    assert fig9[3] == (
        f"dbsc at frac_25: 1.50x less energy, 1.00x faster; accuracy 0.300 vs 0.750 for {CP}. "
        "Less accurate: 95 % Wilson intervals 0.181-0.454 and 0.598-0.858 do not overlap (n = 40 "
        "and 40; no paired per-problem results)."
    )
    fig8 = verdict.verdict("fig8", df).splitlines()
    assert fig8[0].startswith("0 of 1 DBSC runs miss less (miss_rate_hbn) than their matched")
    assert fig8[2].startswith("1 DBSC runs missed less only by losing accuracy")
    assert "dbsc at frac_25 (0.100 vs 0.200 at accuracy 0.300 vs 0.750)" in fig8[2]


def test_paired_per_problem_results_decide_matched_accuracy_with_mcnemar():
    base = [1] * 30 + [0] * 10  # 0.75 of 40
    # 0.60: the Wilson intervals overlap, but the run lost 6 problems the baseline solved and
    # won none: exact McNemar p = 2 / 2**6 = 0.031 < 0.05.
    lost = [0] * 6 + base[6:]
    df = against({"accuracy": 0.6, "correct": lost},
                 {"accuracy": 0.75, "correct": base, "energy_decode_j_per_token": 1.5})  # fmt: skip
    text = verdict.verdict("fig9", df)
    assert text.startswith("0 of 1 DBSC runs")
    assert (
        "Less accurate: exact McNemar test on 40 paired problems: 0 solved only by this run, 6 only "
        "by the baseline run, p = 0.031 (alpha = 0.05)." in text
    )
    assert "1 DBSC runs saved energy only by losing accuracy" in text
    # Without the per-problem results, the same scores are matched by overlapping intervals.
    unpaired = df.drop(columns="correct")
    assert "Matched accuracy: 95 % Wilson intervals" in verdict.verdict("fig9", unpaired)
    # 5 lost, none won: p = 0.0625, matched, and a win (less energy, less time).
    five = [0] * 5 + base[5:]
    df = against({"accuracy": 0.625, "correct": five, "latency_decode_s_per_token": 0.5},
                 {"accuracy": 0.75, "correct": base, "energy_decode_j_per_token": 1.5})  # fmt: skip
    text = verdict.verdict("fig9", df)
    assert (
        text.startswith("1 of 1 DBSC runs")
        and "largest gains at matched accuracy 1.50x energy, 2.00x time" in text
    )
    assert "Matched accuracy: exact McNemar test on 40 paired problems: 0 solved only" in text


def test_fig8_compares_with_the_baseline_run_that_misses_least_at_the_run_s_accuracy():
    # Two baseline runs as accurate as dbsc (0.70): the cheaper in energy misses more.
    df = against(
        {"accuracy": 0.70, "miss_rate_hbn": 0.10},
        {"policy.lam": 0.5, "accuracy": 0.70, "energy_decode_j_per_token": 1.5, "miss_rate_hbn": 0.30},
        {"policy.lam": 0.1, "accuracy": 0.72, "energy_decode_j_per_token": 3.0, "miss_rate_hbn": 0.02},
    )  # fmt: skip
    fig8 = verdict.verdict("fig8", df)
    assert fig8.startswith("0 of 1 DBSC runs miss less (miss_rate_hbn)")
    assert (
        f"dbsc at frac_25: miss_rate_hbn 0.100 vs 0.020 (not lower); accuracy 0.700 vs 0.720 for "
        f"{CP} lam=0.1. Matched accuracy" in fig8
    )
    # Fig. 9 compares energy: the cheapest of them.
    assert f"1.50x less energy, 1.00x faster; accuracy 0.700 vs 0.700 for {CP} lam=0.5." in (
        verdict.verdict("fig9", df)
    )
    # Another miss rate, another comparison.
    refn = df.assign(miss_rate_refn=[0.05, 0.01, 0.02])
    assert "miss_rate_refn 0.020 vs 0.010 (not lower)" in verdict.verdict(
        "fig8", refn, CP, "miss_rate_refn"
    )


def test_baselines_at_other_bit_widths():
    at84 = {"bits": "mat84"}
    # The baseline ran at MAT84 only: a MAT42 run is compared with it, and the verdict says so.
    one = against({"bits": "mat42"}, at84)
    assert (
        f"dbsc mat42 at frac_25: 2.00x less energy, 1.00x faster; accuracy 0.700 vs 0.600 for {CP} mat84 (at bits.name=mat84)"
        in verdict.verdict("fig9", one)
    )
    # The high-bit-normalised miss rates of MAT42 and MAT84 are per other bytes: it says so.
    assert (
        "dbsc mat42 at frac_25: miss_rate_hbn 0.100 vs 0.200 (each per its own high-bit expert "
        "bytes) (lower)" in verdict.verdict("fig8", one)
    )
    # At MAT84 and MAT63, neither the run's: no comparison, and why.
    two = against({"bits": "mat42"}, at84, {"bits": "mat63"})
    text = verdict.verdict("fig9", two)
    assert text.startswith("0 of 1 DBSC runs")
    assert text.splitlines()[-1] == (
        f"dbsc mat42 at frac_25: no {CP} run to compare with: the baseline ran at 2 other "
        "bit-width settings (bits.name=mat84, bits.name=mat63)."
    )
    # At the run's own bit widths too: that one.
    own = against({"bits": "mat42"}, at84, {"bits": "mat42", "energy_decode_j_per_token": 4.0})
    assert f"4.00x less energy, 1.00x faster; accuracy 0.700 vs 0.600 for {CP} mat42, the" in (
        verdict.verdict("fig9", own)
    )


def test_dbsc_more_accurate_than_every_baseline_wins_against_the_most_accurate():
    df = against(
        {"accuracy": 0.9, "latency_decode_s_per_token": 0.5},
        {"accuracy": 0.5, "policy.lam": 0.5, "energy_decode_j_per_token": 2.0},
        {"accuracy": 0.6, "policy.lam": 0.2, "energy_decode_j_per_token": 3.0},
    )
    text = verdict.verdict("fig9", df)
    assert text.startswith("1 of 1 DBSC runs decode with less energy and time per token than "
                           "their matched baseline at matched accuracy; the largest gains at "
                           "matched accuracy 3.00x energy, 2.00x time.")  # fmt: skip
    assert (
        f"accuracy 0.900 vs 0.600 for {CP} lam=0.2, the most accurate baseline run (none was as "
        "accurate). More accurate: 95 % Wilson intervals 0.769-0.960 and 0.446-0.737 do not "
        "overlap" in text
    )


def test_eviction_swept_compares_each_run_with_the_baseline_of_its_eviction():
    lru = report_rows(eviction="lru")
    fifo = [r | {"eviction": "fifo"} for r in report_rows(energy_decode_j_per_token=4.0)]
    fifo[2]["energy_decode_j_per_token"] = fifo[3]["energy_decode_j_per_token"] = 1.0  # dbsc
    lines = verdict.verdict("fig9", pd.DataFrame(lru + fifo)).splitlines()[3:]
    assert len(lines) == len(set(lines)) == 4
    assert lines[0].startswith(f"dbsc eviction=fifo at frac_25: 4.00x less energy, 1.00x faster; "
                               f"accuracy 0.700 vs 0.600 for {CP} eviction=fifo")  # fmt: skip
    assert lines[1].startswith(f"dbsc eviction=lru at frac_25: 2.00x less energy, 1.00x faster; "
                               f"accuracy 0.700 vs 0.600 for {CP} eviction=lru")  # fmt: skip
    # A DBSC run at an eviction the baseline did not run at: no comparison, and why.
    alone = pd.DataFrame(lru + fifo[2:3])
    assert verdict.verdict("fig9", alone).splitlines()[3] == (
        f"dbsc eviction=fifo at frac_25: no {CP} run to compare with: none at its "
        "cache.eviction=fifo."
    )


def test_fig10_verdict_per_warmup_comparison_and_why_not_when_a_policy_field_varies():
    rows = pd.DataFrame(warmup_rows())
    pair = rows[(rows["policy"] == "dbsc") & (rows["cache"] == "frac_25")]
    pair.loc[pair["policy.warmup"] == "pcw", PER_TOKEN] = 0.5
    assert verdict.verdict("fig10", pair) == (
        "PCW: 2.00x lower decode energy and 2.00x speed-up over an empty cache, at accuracy 0.700 "
        "vs 0.700: matched accuracy (95 % Wilson intervals 0.546-0.819 and 0.546-0.819 overlap "
        "(n = 40 and 40; no paired per-problem results)); the best accuracy of the 2 warmups "
        "(tied: every warmup scores the same)."
    )
    # policy.tau varies: two runs per warmup, one line that says why there is no verdict.
    tau = pd.concat([pair, pair.assign(**{"policy.tau": 0.3})])
    assert verdict.verdict("fig10", tau) == (
        "needs one run per warmup: warmup=empty, pcw has several (they differ in policy.tau)."
    )


def test_a_verdict_that_cannot_be_formed_says_why_in_one_line():
    broken = pd.DataFrame(report_rows()).drop(columns="latency_decode_s_per_token")
    for kind in ("fig9", "fig10", "table1"):
        text = verdict.verdict(kind, broken)
        assert text.startswith("no verdict: KeyError") and "\n" not in text, (kind, text)
    # Fig. 8 needs no latency.
    assert verdict.verdict("fig8", broken).startswith("2 of 2 DBSC runs miss less")
