"""sweep.report.compare: matched baselines, per-token normalisation, intervals, Pareto front."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest
from report_tables import lam_rows, report_rows

from sweep.report import compare


def test_report_normalises_per_token_to_the_baseline_at_the_same_model_and_cache():
    def row(policy, bits, cache, energy, latency, tokens):
        return dict(
            status="FINISHED", model="tiny", hardware="h", task="arith", policy=policy,
            bits=bits, cache=cache, energy_decode_j_per_token=energy / tokens,
            latency_decode_s_per_token=latency / tokens,
        )  # fmt: skip

    df = pd.DataFrame(
        [
            row("cache_prior_highbit", "mat84", "frac_25", 4.0, 2.0, 100),
            row("cache_prior_highbit", "mat84", "frac_50", 3.0, 1.0, 100),
            row("dbsc", "mat42", "frac_25", 2.0, 2.0, 200),  # twice the tokens of the baseline
            row("dbsc", "mat84", "frac_50", 1.5, 1.0, 100),
        ]
    )
    out = compare.normalise(df).set_index(["policy", "bits", "cache"])
    assert out.loc[("dbsc", "mat42", "frac_25"), "energy_norm"] == pytest.approx(0.25)
    assert out.loc[("dbsc", "mat42", "frac_25"), "latency_norm"] == pytest.approx(0.5)
    assert out.loc[("dbsc", "mat84", "frac_50"), "energy_norm"] == pytest.approx(0.5)
    # With the baseline at two bit widths, a run is compared with the one at its own bits.
    two = pd.concat([df, pd.DataFrame([row("cache_prior_highbit", "mat42", "frac_25", 8, 8, 100)])])
    out = compare.normalise(two).set_index(["policy", "bits", "cache"])
    assert out.loc[("dbsc", "mat42", "frac_25"), "energy_norm"] == pytest.approx(0.125)


def test_fig9_divides_each_run_by_the_cheapest_baseline_run_at_least_as_accurate():
    out = compare.normalise(lam_rows()).set_index("policy")
    cp = "cache_prior_highbit lam="
    # dbsc (0.70): lam=0.2 (0.70) is as accurate and cheaper than lam=0.05.
    assert out.loc["dbsc", "baseline"] == cp + "0.2" and out.loc["dbsc", "beyond"] is False
    assert out.loc["dbsc", "accuracy_sign"] == 0  # 0.70 vs 0.70: matched
    assert out.loc["dbsc", "energy_norm"] == pytest.approx(0.5)
    assert out.loc["dbsc", "latency_norm"] == pytest.approx(1.0)
    # dbsc_pcw (0.80): no baseline run is as accurate; the most accurate one, flagged.
    assert out.loc["dbsc_pcw", "baseline"] == cp + "0.05" and out.loc["dbsc_pcw", "beyond"] is True
    assert out.loc["lru_lowbit", "baseline"] == cp + "0.5"


def test_report_wilson_interval_and_pareto_front():
    lo, hi = compare.wilson(7, 10)  # 0.7 of 10 documents
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    pts = pd.DataFrame({"x": [0.1, 0.2, 0.3, 0.15], "y": [0.5, 0.7, 0.6, 0.4]})
    assert compare.pareto(pts, "x", "y").index.tolist() == [0, 1]


def test_mcnemar_is_the_exact_two_sided_binomial_test_of_the_discordant_problems():
    from scipy.stats import binomtest

    for won, lost in [*itertools.product(range(9), repeat=2), (60, 40), (3, 30)]:
        if won + lost:
            expected = binomtest(won, won + lost, 0.5).pvalue
            assert compare.mcnemar(won, lost) == pytest.approx(expected, rel=1e-9), (won, lost)
    assert compare.mcnemar(0, 0) == 1.0


def test_accuracy_test_pairs_per_problem_results_else_compares_intervals():
    base = {"accuracy": 0.75, "eval.limit": 40, "correct": [1] * 30 + [0] * 10}
    worse = {"accuracy": 0.6, "eval.limit": 40, "correct": [0] * 6 + [1] * 24 + [0] * 10}
    sign, text = compare.accuracy_test(worse, base)
    assert sign == -1 and text.startswith("exact McNemar test on 40 paired problems: 0 solved")
    sign, text = compare.accuracy_test(base, worse)
    assert sign == 1 and "6 solved only by this run, 0 only by the baseline run" in text
    # Other problems (another eval.limit): not paired; the Wilson intervals of 0.6 and 0.75 of
    # 40 documents overlap.
    sign, text = compare.accuracy_test(worse | {"correct": worse["correct"][:39]}, base)
    assert sign == 0 and text.startswith("95 % Wilson intervals") and "n = 39 and 40" in text
    # No number of documents: the point scores, and it says so.
    sign, text = compare.accuracy_test({"accuracy": 0.74}, {"accuracy": 0.75})
    assert sign == -1 and text.startswith("point scores: no number of documents")
    assert compare.accuracy_test({"accuracy": 0.74}, {"perplexity": 5.0})[0] is None


# Each config field a run and its baseline run must share: the value of the second copy of the
# runs, whose baseline costs twice as much.
MATCHED = {
    "eviction": "fifo",
    "bits.scheme": "trunc",
    "bits.symmetric": True,
    "cache_size": None,  # same cache names, other bytes (e.g. cache.frac overridden)
    "task": "gsm8k",
    "eval.limit": 10,
    "seed": 1,
    "hardware": "laptop",
}


@pytest.mark.parametrize("column", MATCHED)
def test_a_run_is_compared_with_the_baseline_run_at_its_value_of_every_matched_field(column):
    first = report_rows(**{"eviction": "lru", "bits.scheme": "amat", "bits.symmetric": False})
    second = [
        r | {"run": f"{r['run']} 2", column: MATCHED[column] if column != "cache_size" else r["cache_size"] * 4}
        | ({"energy_decode_j_per_token": 4.0} if r["policy"] != "dbsc" else {})
        for r in first
    ]  # fmt: skip
    out = compare.normalise(pd.DataFrame(first + second))
    # Each DBSC run against the baseline run of its own value: the second copy's costs twice as
    # much.
    dbsc = out[out["policy"] == "dbsc"].set_index("run")
    assert dbsc["energy_norm"].to_dict() == {
        "dbsc frac_25": 0.5, "dbsc frac_50": 0.5, "dbsc frac_25 2": 0.25, "dbsc frac_50 2": 0.25
    }  # fmt: skip
