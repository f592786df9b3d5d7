"""A run against the baseline: the baseline run it is matched with, its energy and latency per
token divided by that run's, and the statistics behind "as accurate"."""

from __future__ import annotations

import pandas as pd

from sweep.report.group import series_label
from sweep.report.read import finished

# The paper's baseline: high-bit Cache-Prior.
BASELINE = "cache_prior_highbit"
# A run is normalised to the baseline at the same model, cache size, hardware and task.
MATCH = ["model", "hardware", "task", "cache"]
PER_TOKEN = ["energy_decode_j_per_token", "latency_decode_s_per_token"]


def number(value) -> float:
    return float(pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0])


def wilson(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion measured on n documents."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def interval(run, metric: str = "accuracy") -> tuple[float, float] | None:
    """The 95 % interval of a run's score, from its number of documents (eval.limit)."""
    n = number(run.get("eval.limit"))
    return wilson(run[metric] * n, n) if n == n and n > 0 else None


def pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both axes (lower x, higher y), by x."""
    best, keep = float("-inf"), []
    for i, row in points.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            keep.append(i)
            best = row[y]
    return points.loc[keep]


def candidates(run, base: pd.DataFrame) -> pd.DataFrame:
    """The baseline's runs at `run`'s model, cache size, hardware and task: at the run's bits
    when the baseline ran there, else at its one bit width (none when it ran at several)."""
    same = base
    for col in MATCH:
        same = same[same[col] == run[col]]
    if (same["bits"] == run["bits"]).any():
        return same[same["bits"] == run["bits"]]
    return same if same["bits"].nunique() == 1 else same.iloc[0:0]


def matched_baseline(run, base: pd.DataFrame):
    """(the baseline run `run` is compared with, whether it matches the run's accuracy): of
    `candidates`, the cheapest in decode energy per token that is at least as accurate as the
    run; when none is, the most accurate (False). None and None without a candidate; the
    cheapest and None when there is no accuracy to match."""
    cands = candidates(run, base)
    if cands.empty:
        return None, None
    energy = PER_TOKEN[0]
    acc = run.get("accuracy", float("nan"))
    if "accuracy" not in cands or acc != acc:
        return cands.sort_values(energy).iloc[0], None
    good = cands[cands["accuracy"] >= acc]
    if len(good):
        return good.sort_values(energy).iloc[0], True
    return cands.sort_values(["accuracy", energy], ascending=[False, True]).iloc[0], False


def normalise(df: pd.DataFrame, baseline: str = BASELINE) -> pd.DataFrame:
    """Decode energy and latency per token of every run divided by its matched baseline run's
    (`matched_baseline`): columns `energy_norm`, `latency_norm`, the baseline's values
    (`*_base`), its series label (`baseline`) and `matched`."""
    fin = finished(df).reset_index(drop=True).copy()  # one block: columns are added below
    fin = fin.assign(series=series_label(fin)) if len(fin) else fin
    base = fin[fin["policy"] == baseline]
    if base.empty:
        raise ValueError(
            f"no finished runs of policy {baseline!r} to normalise to; add policy={baseline} to "
            "the sweep or pick another baseline"
        )
    cols = [*PER_TOKEN, *(["accuracy"] if "accuracy" in base else [])]
    picked = []
    for _, run in fin.iterrows():
        b, matched = matched_baseline(run, base)
        values = {f"{c}_base": float("nan") if b is None else b[c] for c in cols}
        picked.append(values | {"baseline": None if b is None else b["series"], "matched": matched})
    out = pd.concat([fin, pd.DataFrame(picked, index=fin.index)], axis=1)
    # True, False or None (no accuracy to match), kept as such rather than as numpy bools.
    out["matched"] = pd.Series([p["matched"] for p in picked], index=fin.index, dtype=object)
    out["energy_norm"] = out[PER_TOKEN[0]] / out[f"{PER_TOKEN[0]}_base"]
    out["latency_norm"] = out[PER_TOKEN[1]] / out[f"{PER_TOKEN[1]}_base"]
    return out
