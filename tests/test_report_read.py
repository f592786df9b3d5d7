"""sweep.report.read against a real MLflow store: the runs of an experiment, one row each, with
the per-problem results the runs logged."""

from __future__ import annotations

import pandas as pd
from conftest_sweep import empty_store
from report_tables import log_runs, report_rows

from sweep.report import read


def test_load_reads_each_run_once_with_its_per_problem_results(tmp_path):
    uri = empty_store(tmp_path)
    ids = log_runs(uri, "e", report_rows(), {0: [1, 0, 1], 2: [1, 1, 0]})
    df = read.load("e", uri).set_index("run_id")
    assert len(df) == 4 and set(df["status"]) == {"FINISHED"}
    assert df.loc[ids[0], "correct"] == [1, 0, 1] and df.loc[ids[2], "correct"] == [1, 1, 0]
    assert df.loc[[ids[1], ids[3]], "correct"].isna().all()  # no problems.json
    # Short names, numbers where they are numbers.
    row = df.loc[ids[2]]
    assert (row["policy"], row["cache"], row["cache_size"]) == ("dbsc", "frac_25", 1e6)
    assert row["accuracy"] == 0.7 and row["miss_rate_hbn"] == 0.1
    assert read.problems([ids[1]]) == {}
    # tidy keeps the latest run of a run key.
    again = pd.DataFrame(
        {
            "run_id": ["a", "b"],
            "tags.run_key": ["k", "k"],
            "start_time": [1, 2],
            "status": "FINISHED",
        }
    )
    assert list(read.tidy(again)["run_id"]) == ["b"]
