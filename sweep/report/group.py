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
# The config fields that name a line of a figure (`series_label`); the bit widths' and the eviction
# are also matched with the baseline's (sweep.report.compare).
SERIES = ("policy.", "bits.", "cache.eviction")
# The cache's size: runs are matched by its bytes (`cache_size`), whichever fields set it.
CACHE_SIZE = frozenset({"cache.name", "cache.frac", "cache.bytes"})
# Report column -> the config field behind it (`tau` -> `policy.tau`).
FIELDS = {v: k.removeprefix("params.") for k, v in COLUMNS.items() if k.startswith("params.")}


def field(column: str) -> str:
    return FIELDS.get(column, column)


def text(values):
    """Config values (a frame or a column) as text, a missing one (a field an older run did not
    log) as "unset": what runs are grouped, labelled and matched by."""
    return values.astype(object).where(values.notna(), "unset").astype(str)


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
    keys = text(fin[fixed])
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
    """The policy name, plus the bit widths where they vary, plus every other field that names a
    line (SERIES) where it varies between runs of the same policy and bit widths (e.g.
    `tau=0.3`, `eviction=fifo`, `symmetric=True`): one label per line of a figure, so that no two
    runs at one cache size share one."""
    keys = text(df[config_columns(df)])
    label = keys["policy"]
    if "bits" in keys and keys["bits"].nunique() > 1:
        label = label + " " + keys["bits"]
    within = [keys[c] for c in ("policy", "bits") if c in keys]
    for col in keys:
        if col not in ("policy", "bits") and field(col).startswith(SERIES):
            varies = keys.groupby(within)[col].transform("nunique") > 1
            label = label.where(~varies, label + f" {field(col).split('.', 1)[1]}=" + keys[col])
    return label


def cache_label(df: pd.DataFrame) -> pd.Series:
    """The cache's name, with its size where one name stands for several sizes."""
    name = text(df["cache"])
    if "cache_size" not in df:
        return name
    size = df["cache_size"].map(lambda v: f"{v / 1e6:.4g} MB" if v >= 1e3 else f"{v:g}")
    several = df.groupby(name)["cache_size"].transform("nunique") > 1
    return name.where(~several, name + " (" + size + ")")


def role(name: str) -> str:
    """What the figures of one setting make of config field `name` where it differs between
    their runs (settings() splits runs on every field not handled here)."""
    if name in EXECUTION:
        return "not compared: where the run executed"
    if name in CACHE_SIZE:
        return "the cache size: matched by bytes"
    if name.startswith("policy."):
        return "a line each; a policy's own fields where they vary within it"
    if name.startswith("bits."):
        return (
            "a line each where it varies, and matched: each run against the baseline run at its "
            "bit widths, else at the baseline's only ones"
        )
    return (
        "a line each where it varies, and matched: each run against the baseline run at its value"
    )


def differences(df: pd.DataFrame) -> str:
    """For the reader: every config field that differs between these runs (of one setting) and
    what the figures make of it (`role`)."""
    roles: dict[str, list[str]] = {}
    for col in config_columns(df):
        if text(df[col]).nunique() > 1:
            roles.setdefault(role(field(col)), []).append(field(col))
    return "; ".join(f"{', '.join(names)} ({r})" for r, names in roles.items())


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


def warmup_groups(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Within one setting: the runs that differ only in their warmup (the comparison of SliceMoE
    Fig. 10), each group with its policy, bits, cache and every other field that differs
    between the groups."""
    if "policy.warmup" not in df:
        return []
    cols = [c for c in config_columns(df) if field(c) not in ("policy.warmup", *EXECUTION)]
    keys = text(df[cols])
    groups = [
        g for _, g in df.groupby([keys[c] for c in cols], sort=True)
        if g["policy.warmup"].nunique() > 1
    ]  # fmt: skip
    both = keys.loc[pd.concat(groups).index] if groups else keys
    differ = [
        c for c in cols
        if c not in VARIED and field(c) not in CACHE_SIZE and both[c].nunique() > 1
    ]  # fmt: skip
    out = []
    for g in groups:
        first = keys.loc[g.index[0]]
        label = " ".join([*first[list(VARIED)], *(f"{field(c)}={first[c]}" for c in differ)])
        out.append((label, g))
    return out
