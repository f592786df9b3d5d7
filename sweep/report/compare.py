"""A run against the baseline: the baseline run it is matched with, its energy and latency per
token divided by that run's, and whether the two are equally accurate."""

from __future__ import annotations

import math
from statistics import NormalDist

import pandas as pd

from sweep.report.group import (
    CACHE_SIZE,
    EXECUTION,
    cache_label,
    config_columns,
    field,
    series_label,
    text,
)
from sweep.report.read import finished

# The paper's baseline: high-bit Cache-Prior.
BASELINE = "cache_prior_highbit"
# Fig. 8's x axis and what its verdict compares: the paper's high-bit-normalised miss rate.
MISS_RATE = "miss_rate_hbn"
PER_TOKEN = ["energy_decode_j_per_token", "latency_decode_s_per_token"]
# The level of the accuracy tests: two runs differ in accuracy only where a test at this level
# tells them apart.
ALPHA = 0.05


def number(value) -> float:
    return float(pd.to_numeric(pd.Series([value]), errors="coerce").iloc[0])


def wilson(successes: float, n: float, z: float = NormalDist().inv_cdf(1 - ALPHA / 2)):
    """The (1 - ALPHA) Wilson score interval of a proportion measured on n documents."""
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return centre - half, centre + half


def documents(run) -> float:
    """How many documents a run's score is the mean of: its per-problem results where it logged
    them, else eval.limit (nan when neither says)."""
    correct = run.get("correct")
    return len(correct) if isinstance(correct, list) else number(run.get("eval.limit"))


def interval(run, metric: str = "accuracy") -> tuple[float, float] | None:
    """The 95 % interval of a run's score, from its number of documents."""
    n = documents(run)
    return wilson(run[metric] * n, n) if n == n and n > 0 else None


def mcnemar(won: int, lost: int) -> float:
    """The exact two-sided McNemar p-value of two paired runs: of the problems only one of them
    solved, `won` by the first and `lost` by it, a split at least this uneven under
    binomial(won + lost, 1/2)."""
    n = won + lost
    tail = sum(math.comb(n, i) for i in range(min(won, lost) + 1))
    return min(1.0, 2 * tail / 2**n)


def accuracy_test(run, base) -> tuple[int | None, str]:
    """Whether `run` is less (-1), as (0) or more (1) accurate than `base`, and the test in words:
    an exact McNemar test where both logged per-problem results for the same problems, else
    whether their Wilson intervals overlap, else (no number of documents) their point scores.
    None without two accuracies."""
    acc, other = run.get("accuracy", math.nan), base.get("accuracy", math.nan)
    if acc != acc or other != other:
        return None, "no accuracy to compare"
    mine, theirs = run.get("correct"), base.get("correct")
    if isinstance(mine, list) and isinstance(theirs, list) and len(mine) == len(theirs):
        won = sum(1 for a, b in zip(mine, theirs) if a and not b)
        lost = sum(1 for a, b in zip(mine, theirs) if b and not a)
        p = mcnemar(won, lost)
        sign = 0 if p >= ALPHA else (1 if won > lost else -1)
        return sign, (
            f"exact McNemar test on {len(mine)} paired problems: {won} solved only by this run, "
            f"{lost} only by the baseline run, p = {p:.2g} (alpha = {ALPHA})"
        )
    ours, theirs_ci = interval(run), interval(base)
    if ours is None or theirs_ci is None:
        sign = (acc > other) - (acc < other)
        return sign, "point scores: no number of documents (eval.limit unset, no problems.json)"
    overlap = ours[1] >= theirs_ci[0] and theirs_ci[1] >= ours[0]
    sign = 0 if overlap else (1 if acc > other else -1)
    level = round(100 * (1 - ALPHA))
    return sign, (
        f"{level} % Wilson intervals {ours[0]:.3f}-{ours[1]:.3f} and {theirs_ci[0]:.3f}-"
        f"{theirs_ci[1]:.3f} {'overlap' if overlap else 'do not overlap'} "
        f"(n = {documents(run):.0f} and {documents(base):.0f}; no paired per-problem results)"
    )


def pareto(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """The points no other point beats on both axes (lower x, higher y), by x."""
    best, keep = float("-inf"), []
    for i, row in points.sort_values([x, y], ascending=[True, False]).iterrows():
        if row[y] > best:
            keep.append(i)
            best = row[y]
    return points.loc[keep]


def match_keys(df: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(exact, bits): the columns a run shares with its baseline run, every config field but the
    policy's and where it ran, the cache by its bytes (cache_size); and the bit-width fields, which
    it shares where the baseline ran at the run's."""
    cols = [c for c in config_columns(df) if field(c) not in EXECUTION | CACHE_SIZE]
    group = {c: field(c).split(".")[0] for c in cols}
    exact = [c for c in cols if group[c] not in ("policy", "bits")]
    exact.append("cache_size" if "cache_size" in df else "cache")
    return exact, [c for c in cols if group[c] == "bits"]


def _setting(keys: pd.Series) -> str:
    return " ".join(f"{field(c)}={v}" for c, v in keys.items())


def candidates(i, keys: pd.DataFrame, base: pd.Index, exact, bits) -> tuple[pd.Index, str]:
    """The baseline runs (of `base`) run `i` may be compared with, or none and why: those equal
    to it in every `exact` column (`keys` holds them as text), at the run's bit widths (every
    `bits` column) where the baseline ran there, else at the baseline's one bit-width setting."""
    same = base
    for col in exact:
        here = same[keys.loc[same, col] == keys.at[i, col]]
        if here.empty:
            return here, f"none at its {field(col)}={keys.at[i, col]}"
        same = here
    if not bits:
        return same, ""
    at_bits = same[(keys.loc[same, bits] == keys.loc[i, bits]).all(axis=1)]
    if len(at_bits):
        return at_bits, ""
    others = keys.loc[same, bits].drop_duplicates()
    if len(others) == 1:
        return same, ""
    listed = ", ".join(_setting(row[row != keys.loc[i, bits]]) for _, row in others.iterrows())
    return same[:0], f"the baseline ran at {len(others)} other bit-width settings ({listed})"


def choose(run, cands: pd.DataFrame, by: str):
    """(the baseline run `run` is compared with, whether no candidate was as accurate): of
    `cands`, the lowest in `by` (what is compared: energy per token, a miss rate) that is at
    least as accurate as the run; when none is, the most accurate (True); the lowest and None
    when there is no accuracy to match."""
    acc = run.get("accuracy", math.nan)
    if "accuracy" not in cands or acc != acc:
        return cands.sort_values(by).iloc[0], None
    good = cands[cands["accuracy"] >= acc]
    if len(good):
        return good.sort_values(by).iloc[0], False
    return cands.sort_values(["accuracy", by], ascending=[False, True]).iloc[0], True


def normalise(df: pd.DataFrame, baseline: str = BASELINE, by: str = PER_TOKEN[0]) -> pd.DataFrame:
    """Every finished run beside the baseline run it is compared with (`candidates`, `choose`
    by `by`) and their decode energy and latency per token divided by that run's: columns
    `series` and `at` (its cache), `energy_norm`, `latency_norm`, the baseline run's values
    (`*_base`), label (`baseline`) and other bit widths (`baseline_bits`, "" at the run's),
    `beyond` (no baseline run was as accurate), how the accuracies compare (`accuracy_sign`,
    `accuracy_test`: see `accuracy_test`), and `why` there is no baseline run where there is
    none."""
    fin = finished(df).reset_index(drop=True).copy()  # one block: columns are added below
    fin = fin.assign(series=series_label(fin), at=cache_label(fin)) if len(fin) else fin
    base = fin.index[fin["policy"] == baseline]
    if base.empty:
        raise ValueError(
            f"no finished runs of policy {baseline!r} to normalise to; add policy={baseline} to "
            "the sweep or pick another baseline"
        )
    exact, bits = match_keys(fin)
    keys = text(fin[exact + bits])
    cols = [c for c in dict.fromkeys([*PER_TOKEN, by, "accuracy"]) if c in fin]
    picked = []
    for i, run in fin.iterrows():
        found, why = candidates(i, keys, base, exact, bits)
        if found.empty:
            picked.append({f"{c}_base": math.nan for c in cols} | {"baseline": None, "why": why})
            continue
        b, beyond = choose(run, fin.loc[found], by)
        sign, test = accuracy_test(run, b)
        other = keys.loc[b.name, bits] != keys.loc[i, bits]
        picked.append({f"{c}_base": b[c] for c in cols} | {
            "baseline": b["series"], "baseline_bits": _setting(keys.loc[b.name, bits][other]),
            "beyond": beyond, "accuracy_sign": sign, "accuracy_test": test, "why": "",
        })  # fmt: skip
    out = pd.concat([fin, pd.DataFrame(picked, index=fin.index)], axis=1)
    # True, False or None, -1, 0, 1 or None: kept as such rather than as numpy values or floats.
    for col in ("beyond", "accuracy_sign"):
        out[col] = pd.Series([p.get(col) for p in picked], index=fin.index, dtype=object)
    for col, norm in zip(PER_TOKEN, ("energy_norm", "latency_norm")):
        if col in out:  # Fig. 8 needs neither
            out[norm] = out[col] / out[f"{col}_base"]
    return out
