"""sweep.report on runs as `tidy` leaves them: grouping, matched baselines, Table 1, the
miss-ratio curves and the HTML page. No MLflow, no model."""

from __future__ import annotations

import itertools

import pandas as pd
import pytest

from sweep import report


def report_rows(**fixed):
    """Finished runs of two policies at two cache sizes, as sweep.report.tidy leaves them."""
    rows = []
    for policy, (cache, size) in itertools.product(
        ("cache_prior_highbit", "dbsc"), (("frac_25", 1e6), ("frac_50", 2e6))
    ):
        good = policy == "dbsc"
        rows.append(dict(
            run=f"{policy} {cache}", status="FINISHED", model="tiny", bits="mat84",
            hardware="h", task="arith", policy=policy, cache=cache, cache_size=size,
            seed=0, **{"eval.limit": 40, "policy.tau": 0.5, "model.device": "cpu"},
            accuracy=0.7 if good else 0.6, miss_rate_refn=0.1 if good else 0.2,
            energy_decode_j_per_token=1.0 if good else 2.0, latency_decode_s_per_token=1.0,
        ) | fixed)  # fmt: skip
    return rows


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
    out = report.normalise(df).set_index(["policy", "bits", "cache"])
    assert out.loc[("dbsc", "mat42", "frac_25"), "energy_norm"] == pytest.approx(0.25)
    assert out.loc[("dbsc", "mat42", "frac_25"), "latency_norm"] == pytest.approx(0.5)
    assert out.loc[("dbsc", "mat84", "frac_50"), "energy_norm"] == pytest.approx(0.5)
    # With the baseline at two bit widths, a run is compared with the one at its own bits.
    two = pd.concat([df, pd.DataFrame([row("cache_prior_highbit", "mat42", "frac_25", 8, 8, 100)])])
    out = report.normalise(two).set_index(["policy", "bits", "cache"])
    assert out.loc[("dbsc", "mat42", "frac_25"), "energy_norm"] == pytest.approx(0.125)


def lam_rows():
    """The baseline at three strengths (more lam: cheaper, less accurate) and three runs."""
    rows = report_rows()[:1]
    base = rows[0] | {"cache": "frac_25", "cache_size": 1e6}
    rows = [
        base | {"run": f"cp lam={lam}", "policy.lam": lam, "accuracy": acc,
                "energy_decode_j_per_token": e, "latency_decode_s_per_token": e / 2}
        for lam, acc, e in ((0.05, 0.75, 3.0), (0.2, 0.70, 2.0), (0.5, 0.30, 1.0))
    ]  # fmt: skip
    for policy, acc in (("dbsc", 0.70), ("dbsc_pcw", 0.80), ("lru_lowbit", 0.20)):
        rows.append(base | {"run": policy, "policy": policy, "policy.lam": 0.0, "accuracy": acc,
                            "energy_decode_j_per_token": 1.0, "latency_decode_s_per_token": 1.0})  # fmt: skip
    return pd.DataFrame(rows)


def test_fig9_divides_each_run_by_the_cheapest_baseline_run_at_least_as_accurate(tmp_path):
    out = report.normalise(lam_rows()).set_index("policy")
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
    text = report.verdict("fig9", lam_rows())
    assert text.startswith("1 of 2 DBSC runs decode with less energy and time per token")
    assert (
        f"dbsc at frac_25: 2.00x less energy, 1.00x faster; accuracy 0.700 vs 0.700 for {cp}0.2."
        in text
    )
    assert (
        f"0.800 vs 0.750 for {cp}0.05, the most accurate baseline run (none was as accurate" in text
    )
    assert "0.750 is within this run's 95 % interval" in text
    written = {p.name for p in report.write_report(lam_rows(), tmp_path)}
    assert {"accuracy_vs_miss_rate.png", "energy_latency.png", "index.html"} <= written


def test_report_never_puts_runs_of_different_settings_in_one_figure(tmp_path, capsys):
    df = pd.DataFrame(report_rows() + report_rows(**{"eval.limit": 10, "model.device": "cuda"}))
    groups = report.settings(df)
    # eval.limit sets them apart; where they ran (model.device) does not.
    assert [desc for desc, _ in groups] == ["eval.limit=10", "eval.limit=40"]
    assert [len(g) for _, g in groups] == [4, 4]
    written = {p.name for p in report.write_report(df, tmp_path)}
    assert {"accuracy_vs_miss_rate.png", "accuracy_vs_miss_rate_2.png"} <= written
    assert {"energy_latency.png", "energy_latency_2.png"} <= written
    err = capsys.readouterr().err
    assert "2 settings that must not share a figure" in err and "eval.limit=10 (4 runs)" in err
    # One setting: one figure, no message about settings.
    assert [d for d, _ in report.settings(pd.DataFrame(report_rows()))] == [""]


def test_report_series_tell_apart_runs_of_one_policy_with_other_parameters():
    df = pd.DataFrame(report_rows() + report_rows(policy="dbsc", **{"policy.tau": 0.3}))
    labels = set(report.series_label(df))
    assert labels == {"cache_prior_highbit", "dbsc tau=0.5", "dbsc tau=0.3"}


def test_report_wilson_interval_and_pareto_front():
    lo, hi = report.wilson(7, 10)  # 0.7 of 10 documents
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    pts = pd.DataFrame({"x": [0.1, 0.2, 0.3, 0.15], "y": [0.5, 0.7, 0.6, 0.4]})
    assert report.pareto(pts, "x", "y").index.tolist() == [0, 1]


def test_report_draws_the_warmup_comparison_for_runs_that_differ_only_in_warmup(tmp_path):
    rows = [
        r | {"run_id": f"r{i}", "policy.warmup": w, "miss_rate": 0.2}
        for i, (r, w) in enumerate(zip(report_rows() * 2, ["empty"] * 4 + ["pcw"] * 4))
    ]
    df = pd.DataFrame(rows)
    groups = report.warmup_groups(df)
    assert len(groups) == 4 and all(set(g["policy.warmup"]) == {"empty", "pcw"} for g in groups)
    steps = {r["run_id"]: [0.9, 0.5, 0.2] for r in rows}
    written = {p.name for p in report.write_report(df, tmp_path, steps=steps)}
    assert {"warmup.png", "warmup_2.png", "warmup_3.png", "warmup_4.png"} <= written
    # Every warmup at every cache size: Figs. 8 and 9 keep them all.
    assert report.main_warmups(df)[1] == 0


def test_figs_8_and_9_keep_the_warmup_a_policy_ran_at_every_cache_size():
    lru = [r | {"policy.warmup": "lru"} for r in report_rows()]
    extra = [lru[3] | {"policy.warmup": w} for w in ("empty", "pcw")]  # dbsc at frac_50
    kept, folded = report.main_warmups(pd.DataFrame(lru + extra))
    assert folded == 2 and set(kept["policy.warmup"]) == {"lru"} and len(kept) == 4
    names = [s.name for s in report.sections(pd.DataFrame(lru + extra))]
    assert names == [
        "accuracy_vs_miss_rate.png", "energy_latency.png", "warmup.png", "miss_ratio_curves.png"
    ]  # fmt: skip


def table1_rows():
    """Perplexity runs as paper_table1 makes them, plus runs Table 1 has no cell for."""
    base = dict(
        status="FINISHED", model="tiny", task="wikitext", hardware="h", cache="frac_25",
        cache_size=1e6, seed=0, **{"eval.limit": 16, "policy.routing": "topk"},
    )  # fmt: skip
    rows = []
    for (h, l), sym in itertools.product(((4, 2), (8, 4)), (True, False)):
        bits = {"bits": f"mat{h}{l}", "bits.high": str(h), "bits.low": str(l),
                "bits.symmetric": str(sym)}  # fmt: skip
        rows.append(base | bits | {"policy": "lru_highbit", "policy.precision": "high",
                                   "bits.scheme": "amat", "perplexity": 4.0 + h / 100 + sym})  # fmt: skip
        for scheme in ("base", "trunc", "amat"):
            ppl = {"base": 5.0, "trunc": 500.0, "amat": 5.5}[scheme] + sym
            rows.append(base | bits | {"policy": "lru_lowbit", "policy.precision": "low",
                                       "bits.scheme": scheme, "perplexity": ppl + l / 100})  # fmt: skip
    fp = {"bits": "fp16", "bits.high": "null", "bits.low": "null", "bits.symmetric": "False"}
    rows.append(base | fp | {"policy": "lru_highbit", "policy.precision": "high",
                             "bits.scheme": "amat", "perplexity": 3.9})  # fmt: skip
    # Not a Table 1 cell: cache-aware routing changes which experts run.
    rows.append(rows[1] | {"policy.routing": "cache_prior", "policy": "cp", "perplexity": 9.0})
    return pd.DataFrame(rows)


def test_table1_from_perplexity_runs(tmp_path):
    cells = report.table1_cells(table1_rows())
    assert cells["fp"] == 3.9
    # The high-bit path fills every scheme of its quantizer; AMAT is the asymmetric one.
    assert cells[("Sym", "base", 4, 2, 4)] == cells[("Sym", "trunc", 4, 2, 4)] == 5.04
    assert cells[("AMAT", "amat", 8, 4, 8)] == cells[("Asym", "base", 8, 4, 8)] == 4.08
    assert cells[("Asym", "trunc", 4, 2, 2)] == 500.02 and cells[("AMAT", "amat", 4, 2, 2)] == 5.52
    assert cells[("Sym", "base", 8, 4, 4)] == 6.04  # not the cache-aware run's 9.0
    assert not [k for k in cells if k != "fp" and k[0] == "Sym" and k[1] == "amat"]
    assert ("AMAT", "amat", 6, 3, 3) not in cells  # MAT63 was not run
    written = {p.name: p for p in report.write_report(table1_rows(), tmp_path)}
    assert {"table1.md", "table1.csv", "index.html"} <= set(written)
    assert not {"accuracy_vs_miss_rate.png", "energy_latency.png"} & set(written)
    md = written["table1.md"].read_text()
    assert "| Asym | trunc | 4.04 | 500 | - | - | 4.08 | 500 |" in md
    assert "unquantized experts: 3.9" in md
    csv = pd.read_csv(written["table1.csv"])
    assert list(csv.columns[:4]) == ["quant", "scheme", "MAT42 4b", "MAT42 2b"] and len(csv) == 5
    text = report.verdict("table1", table1_rows())
    assert text.startswith("At 2 of 2 bit widths Trunc's low path is at least 10x AMAT's")
    assert "MAT42 2-bit path: AMAT 5.52, Asym Base 5.02 (AMAT 1.10x), Sym Base 6.02" in text
    assert "Trunc 500 or worse (91x AMAT)" in text
    page = written["index.html"].read_text()
    assert report.CLAIMS["table1"][:40] in page and "<td>500.02</td>" not in page
    # Beside the figures' runs, each file keeps its plain name: numbers are for repeats.
    both = pd.concat([pd.DataFrame(report_rows()), table1_rows()])
    names = [s.name for s in report.sections(both)]
    assert names[0] == "accuracy_vs_miss_rate.png" and "table1.md" in names


def test_miss_ratio_curves_put_each_stream_and_its_runs_on_one_figure(tmp_path, capsys):
    rows = [
        r | {"run_id": f"r{i}", "stream": r["policy"], "stream_source": "replayed"}
        for i, r in enumerate(report_rows())
    ]
    rows[0]["stream_source"] = "recorded"
    curve = pd.DataFrame(
        {"cache_capacity_bytes": [5e5, 1e6, 2e6], "miss_rate_refn": [0.4, 0.2, 0.1]}
    )
    found = report.streams(pd.DataFrame(rows), {"r0": curve})
    assert [(label, len(members)) for label, _, members in found] == [
        ("cache_prior_highbit mat84", 2)
    ]
    written = {
        p.name for p in report.write_report(pd.DataFrame(rows), tmp_path, curves={"r0": curve})
    }
    assert "miss_ratio_curves.png" in written
    report.write_report(pd.DataFrame(rows), tmp_path / "none")
    assert (
        "miss_ratio_curves.png skipped: no run of this setting recorded a stream"
        in capsys.readouterr().err
    )


def test_report_html_puts_each_figure_next_to_the_paper_claim_and_what_the_data_says(tmp_path):
    df = pd.DataFrame(report_rows())
    fig9 = report.verdict("fig9", df)
    # dbsc: half the baseline's energy per token (1.0 vs 2.0), same latency, more accurate.
    head, first = fig9.splitlines()[:2]
    assert head.startswith("0 of 2 DBSC runs decode with less energy and time per token")
    assert first.startswith("dbsc at frac_25: 2.00x less energy, 1.00x faster; accuracy 0.700 vs")
    assert "none was as accurate; 0.600 is within this run's 95 % interval" in fig9
    better = pd.DataFrame(report_rows(**{"eval.limit": 400}))  # 0.7 +- 0.045 at n=400
    assert "0.600 is below this run's 95 % interval" in report.verdict("fig8", better)
    page = [p for p in report.write_report(df, tmp_path) if p.name == "index.html"][0]
    text = page.read_text()
    for name in ("accuracy_vs_miss_rate.png", "energy_latency.png"):
        assert name in text
    assert report.CLAIMS["fig9"].split(",")[0] in text and "data:image/png;base64," in text
