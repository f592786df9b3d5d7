"""`python -m sweep.report`: its flags, and the report of a real MLflow store."""

from __future__ import annotations

import pytest
from conftest_sweep import empty_store
from report_tables import log_runs, report_rows

from sweep.report.__main__ import main, parser


def test_miss_rate_flag_takes_any_miss_rate_metric_by_its_short_name():
    def miss_rate(*words):
        return parser().parse_args(["--experiment", "e", *words]).miss_rate

    assert miss_rate() == "miss_rate_hbn"
    assert miss_rate("--miss-rate", "refn") == "miss_rate_refn"
    assert miss_rate("--miss-rate", "miss_rate") == "miss_rate"
    assert miss_rate("--miss-rate", "msb_steady") == "miss_rate_msb_steady"
    with pytest.raises(SystemExit):
        miss_rate("--miss-rate", "bytes")


def test_the_report_of_a_store_pairs_runs_that_logged_per_problem_results(tmp_path, capsys):
    uri = empty_store(tmp_path)
    solved = [1] * 24 + [0] * 16  # the baseline's 0.6 of 40
    log_runs(uri, "e", report_rows(), {0: solved, 2: [1] * 28 + [0] * 12})
    main(["--experiment", "e", "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "energy_latency.png").is_file()
    html = (tmp_path / "out" / "index.html").read_text()
    # frac_25: both logged problems.json; frac_50: neither.
    assert "exact McNemar test on 40 paired problems: 4 solved only by this run, 0 only" in html
    assert "95 % Wilson intervals" in html
    assert str(tmp_path / "out" / "index.html") in capsys.readouterr().out
