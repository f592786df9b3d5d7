"""Which runs may share a figure (a setting), the line of a figure each run is on (its series),
and which of them Figs. 8-10 take."""

from __future__ import annotations

import pandas as pd

from sweep.report.read import COLUMNS, finished

# What the comparison figures vary: the policy, the bit widths and the cache. Every other config
# field must be equal for runs to share a figure (`settings`).
VARIED = ("policy", "bits", "cache")
# Where and how a run was executed, not what it measured.
EXECUTION = frozenset({"model.device", "model.path", "trace", "trace_path"})
# Report column -> the config field behind it (`tau` -> `policy.tau`).
FIELDS = {v: k.removeprefix("params.") for k, v in COLUMNS.items() if k.startswith("params.")}


def field(column: str) -> str:
    return FIELDS.get(column, column)


def config_columns(df: pd.DataFrame) -> list[str]:
    """The report columns that hold config fields (every RunConfig field MLflow logged)."""
    from dataclasses import asdict

    from slicemoe.config import RunConfig
    from sweep.jobs import flatten

    fields = set(flatten(asdict(RunConfig())))
    return [c for c in df.columns if field(c) in fields]


def settings(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The finished runs split into groups that may share a figure: equal in every config field
    but the policy, bit widths and cache (VARIED) and how they were executed. Each group comes
    with a description of the fields that set it apart ("" when there is one group)."""
    fin = finished(df)
    fixed = [
        c for c in config_columns(fin)
        if field(c).split(".")[0] not in VARIED and field(c) not in EXECUTION
    ]  # fmt: skip
    if fin.empty:
        return []
    keys = fin[fixed].astype(str)
    differ = [c for c in fixed if keys[c].nunique() > 1]
    if not differ:
        return [("", fin)]
    groups = []
    for values, group in fin.groupby([keys[c] for c in differ], sort=True):
        values = values if isinstance(values, tuple) else (values,)
        desc = " ".join(f"{field(c)}={v}" for c, v in zip(differ, values))
        groups.append((desc, group))
    return groups


def describe(df: pd.DataFrame, groups: list[tuple[str, pd.DataFrame]]) -> str:
    """What the report grouped and what it left out, for the reader."""
    lines = [f"{len(df)} runs, {len(finished(df))} finished"]
    dropped = df[df["status"] != "FINISHED"] if "status" in df else df.iloc[0:0]
    if len(dropped):
        lines.append(f"left out {len(dropped)} runs not FINISHED: {', '.join(dropped['run'])}")
    if len(groups) > 1:
        lines.append(f"{len(groups)} settings that must not share a figure (each gets its own):")
        lines += [f"  {i}: {desc} ({len(g)} runs)" for i, (desc, g) in enumerate(groups, 1)]
    return "\n".join(lines)


def series_label(df: pd.DataFrame) -> pd.Series:
    """The policy name, plus the bit widths where they vary, plus any policy field that varies
    between runs of the same policy (e.g. `tau=0.3`): one label per line of a figure."""
    label = df["policy"].astype(str)
    if "bits" in df and df["bits"].nunique() > 1:
        label = label + " " + df["bits"].astype(str)
    own = [c for c in config_columns(df) if field(c).startswith("policy.") and c != "policy"]
    for col in own:
        varies = df.groupby("policy")[col].transform(lambda v: v.astype(str).nunique() > 1)
        label = label.where(~varies, label + f" {field(col).split('.')[1]}=" + df[col].astype(str))
    return label


def main_warmups(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Figs. 8 and 9 compare policies: of a policy whose runs differ in `policy.warmup`, keep the
    warmup it ran at the most cache sizes (all of them on a tie). Returns the runs kept and how
    many were left to the warmup figure."""
    if "policy.warmup" not in df:
        return df, 0
    keep = pd.Series(True, index=df.index)
    for _, runs in df.groupby("policy"):
        reach = runs.groupby("policy.warmup")["cache"].nunique()
        if len(reach) > 1 and (reach == reach.max()).sum() == 1:
            keep[runs.index] = runs["policy.warmup"] == reach.idxmax()
    return df[keep], int((~keep).sum())


def warmup_groups(df: pd.DataFrame) -> list[pd.DataFrame]:
    """Within one setting: the runs of one policy, bits and cache that differ only in their
    warmup (the comparison of SliceMoE Fig. 10)."""
    if "policy.warmup" not in df:
        return []
    return [
        g for _, g in df.groupby(["policy", "bits", "cache"], sort=True)
        if g["policy.warmup"].nunique() > 1
    ]  # fmt: skip
