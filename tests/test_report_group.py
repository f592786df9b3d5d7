"""sweep.report.group: which runs share a figure, series labels, the warmups Figs. 8-10 take."""

from __future__ import annotations

import pandas as pd
import pytest
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
    assert len(groups) == 4 and all(set(g["policy.warmup"]) == {"empty", "pcw"} for _, g in groups)
    assert [label for label, _ in groups][:2] == ["cache_prior_highbit mat84 frac_25",
                                                   "cache_prior_highbit mat84 frac_50"]  # fmt: skip
    # Every warmup at every cache size: Figs. 8 and 9 keep them all.
    assert group.main_warmups(df)[1] == 0


def test_figs_8_and_9_keep_the_warmup_a_policy_ran_at_every_cache_size():
    lru = [r | {"policy.warmup": "lru"} for r in report_rows()]
    extra = [lru[3] | {"policy.warmup": w} for w in ("empty", "pcw")]  # dbsc at frac_50
    kept, folded = group.main_warmups(pd.DataFrame(lru + extra))
    assert folded == 2 and set(kept["policy.warmup"]) == {"lru"} and len(kept) == 4


@pytest.mark.parametrize(
    "column, value", [("eviction", "fifo"), ("bits.scheme", "trunc"), ("bits.symmetric", True)]
)
def test_series_labels_name_the_eviction_and_bit_fields_where_they_vary(column, value):
    first = report_rows(**{"eviction": "lru", "bits.scheme": "amat", "bits.symmetric": False})
    df = pd.DataFrame(first + [r | {column: value} for r in first])
    labels = group.series_label(df)
    name = column.split(".")[-1]
    assert set(labels) == {
        f"{policy} {name}={v}" for policy in ("cache_prior_highbit", "dbsc") for v in (first[0][column], value)
    }  # fmt: skip
    # No two runs at one cache size share a label (a line of Fig. 8, a bar of Fig. 9).
    assert not df.assign(label=labels).duplicated(["label", "cache"]).any()
    role = (
        "its bit widths, else at the baseline's only ones"
        if column.startswith("bits.")
        else "its value"
    )
    assert (
        f"; {group.field(column)} (a line each where it varies, and matched: each run against the "
        f"baseline run at {role})" in group.differences(df)
    )


def test_series_labels_leave_out_fields_the_bit_widths_set():
    rows = [r | {"bits.high": "8", "bits.low": "4"} for r in report_rows()]
    rows += [r | {"bits": "mat42", "bits.high": "4", "bits.low": "2"} for r in report_rows()]
    assert set(group.series_label(pd.DataFrame(rows))) == {
        "cache_prior_highbit mat84", "cache_prior_highbit mat42", "dbsc mat84", "dbsc mat42"
    }  # fmt: skip


@pytest.mark.parametrize(
    "column, value", [("task", "gsm8k"), ("eval.limit", 10), ("seed", 1), ("hardware", "laptop")]
)
def test_settings_split_runs_on_the_fields_no_figure_compares(column, value):
    df = pd.DataFrame(report_rows() + report_rows(**{column: value}))
    groups = group.settings(df)
    assert len(groups) == 2 and all(len(g) == 4 and g[column].nunique() == 1 for _, g in groups)
    assert {desc for desc, _ in groups} == {
        f"{group.field(column)}={v}" for v in (report_rows()[0][column], value)
    }


def test_the_cache_is_matched_by_its_bytes_and_named_with_them_where_a_name_has_several():
    rows = report_rows() + [r | {"cache_size": 3e6} for r in report_rows()[:1]]
    df = pd.DataFrame(rows).assign(cache_frac=[0.25, 0.5, 0.25, 0.5, 0.3])
    assert list(group.cache_label(df)) == [
        "frac_25 (1 MB)", "frac_50", "frac_25 (1 MB)", "frac_50", "frac_25 (3 MB)"
    ]  # fmt: skip
    assert group.differences(df) == (
        "policy.name (a line each; a policy's own fields where they vary within it); "
        "cache.name, cache.frac (the cache size: matched by bytes)"
    )


def test_warmup_groups_differ_only_in_warmup_when_a_policy_field_varies():
    rows = warmup_rows()
    tau = [
        r | {"run_id": r["run_id"] + "t", "policy.tau": 0.3} for r in rows if r["policy"] == "dbsc"
    ]
    groups = group.warmup_groups(pd.DataFrame(rows + tau))
    assert len(groups) == 6
    assert all(len(g) == 2 and set(g["policy.warmup"]) == {"empty", "pcw"} for _, g in groups)
    labels = [label for label, _ in groups]
    assert (
        "dbsc mat84 frac_25 policy.tau=0.3" in labels
        and "dbsc mat84 frac_25 policy.tau=0.5" in labels
    )


def test_a_field_an_older_run_did_not_log_is_a_value_of_its_own():
    # No seed, no eviction logged by the older runs (NaN as tidy leaves a missing param).
    old = report_rows(seed=float("nan"))
    new = report_rows(eviction="fifo")
    df = pd.DataFrame(old + new)
    assert [desc for desc, _ in group.settings(df)] == ["seed=0.0", "seed=unset"]
    same_seed = pd.DataFrame(report_rows() + new)
    assert set(group.series_label(same_seed)) == {
        f"{policy} eviction={v}" for policy in ("cache_prior_highbit", "dbsc") for v in ("unset", "fifo")
    }  # fmt: skip
