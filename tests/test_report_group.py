"""sweep.report.group: which runs share a figure, series labels, the warmups Figs. 8-10 take."""

from __future__ import annotations

import pandas as pd
from report_tables import report_rows, warmup_rows

from sweep.report import group


def test_report_never_puts_runs_of_different_settings_in_one_figure():
    df = pd.DataFrame(report_rows() + report_rows(**{"eval.limit": 10, "model.device": "cuda"}))
    groups = group.settings(df)
    # eval.limit sets them apart; where they ran (model.device) does not.
    assert [desc for desc, _ in groups] == ["eval.limit=10", "eval.limit=40"]
    assert [len(g) for _, g in groups] == [4, 4]
    text = group.describe(df, groups)
    assert "2 settings that must not share a figure" in text and "eval.limit=10 (4 runs)" in text
    # One setting: one figure, no message about settings.
    assert [d for d, _ in group.settings(pd.DataFrame(report_rows()))] == [""]


def test_report_series_tell_apart_runs_of_one_policy_with_other_parameters():
    df = pd.DataFrame(report_rows() + report_rows(policy="dbsc", **{"policy.tau": 0.3}))
    labels = set(group.series_label(df))
    assert labels == {"cache_prior_highbit", "dbsc tau=0.5", "dbsc tau=0.3"}


def test_warmup_groups_are_the_runs_that_differ_only_in_warmup():
    df = pd.DataFrame(warmup_rows())
    groups = group.warmup_groups(df)
    assert len(groups) == 4 and all(set(g["policy.warmup"]) == {"empty", "pcw"} for g in groups)
    # Every warmup at every cache size: Figs. 8 and 9 keep them all.
    assert group.main_warmups(df)[1] == 0


def test_figs_8_and_9_keep_the_warmup_a_policy_ran_at_every_cache_size():
    lru = [r | {"policy.warmup": "lru"} for r in report_rows()]
    extra = [lru[3] | {"policy.warmup": w} for w in ("empty", "pcw")]  # dbsc at frac_50
    kept, folded = group.main_warmups(pd.DataFrame(lru + extra))
    assert folded == 2 and set(kept["policy.warmup"]) == {"lru"} and len(kept) == 4
