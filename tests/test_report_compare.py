"""sweep.report.compare: matched baselines, per-token normalisation, intervals, Pareto front."""

from __future__ import annotations

import pandas as pd
import pytest
from report_tables import lam_rows

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
    assert out.loc["dbsc", "baseline"] == cp + "0.2" and out.loc["dbsc", "matched"] is True
    assert out.loc["dbsc", "energy_norm"] == pytest.approx(0.5)
    assert out.loc["dbsc", "latency_norm"] == pytest.approx(1.0)
    # dbsc_pcw (0.80): no baseline run is as accurate; the most accurate one, flagged.
    assert (
        out.loc["dbsc_pcw", "baseline"] == cp + "0.05" and out.loc["dbsc_pcw", "matched"] is False
    )
    assert out.loc["lru_lowbit", "baseline"] == cp + "0.5"


def test_report_wilson_interval_and_pareto_front():
    lo, hi = compare.wilson(7, 10)  # 0.7 of 10 documents
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    pts = pd.DataFrame({"x": [0.1, 0.2, 0.3, 0.15], "y": [0.5, 0.7, 0.6, 0.4]})
    assert compare.pareto(pts, "x", "y").index.tolist() == [0, 1]
