"""What a sweep's runs say of each claim of the paper (CLAIMS): the text beside every figure
and table of the report."""

from __future__ import annotations

import pandas as pd

from sweep.report import table1
from sweep.report.compare import ALPHA, BASELINE, MISS_RATE, PER_TOKEN, accuracy_test, normalise
from sweep.report.group import EXECUTION, config_columns, field, text
from sweep.report.read import finished

CLAIMS = {
    "table1": "Low-bit truncation alone (Trunc) degrades the model severely, whereas AMAT's low-bit "
    "path stays compatible with, and can even beat, independently quantized low-bit experts "
    "(Base) (WikiText-2 perplexity of DeepSeek-V2-Lite and Qwen1.5-MoE).",
    "fig8": "DBSC (with AMAT, optionally PCW) keeps near-high-bit accuracy at a lower miss rate "
    "than the high-bit Cache-Prior baseline.",
    "fig9": "Against high-bit Cache-Prior at matched accuracy, DBSC cuts decode energy by up to "
    "2.37x (DeepSeek-V2-Lite) / 2.85x (Qwen1.5-MoE-A2.7B) and decode latency by up to 1.81x / "
    "1.64x.",
    "fig10": "PCW gives 2.31x lower decode energy and a 1.96x speed-up over an empty cache, and "
    "the best accuracy among the initial cache states.",
    "mrc": "No such figure in the paper. Each curve is one recorded request stream replayed at "
    "every cache size: where each policy's cache sizes sit on it, and how much more DRAM buys.",
    "optimality": "No such figure in the paper, which evicts by plain LRU to isolate bit-sliced "
    "caching from eviction heuristics. Each bar is a run's decode miss rate, the line across it "
    "Belady's oracle on the same request stream and DRAM bytes: what a better eviction could "
    "still win.",
}
DBSC = ("dbsc", "dbsc_pcw")
# How a run's accuracy compares with another's (sweep.report.compare.accuracy_test): only -1
# (less accurate) keeps a saving from counting.
WORDS = {-1: "less accurate", 0: "matched accuracy", 1: "more accurate", None: "no accuracy"}
RULE = (
    "A run counts only at matched accuracy: not less accurate than the baseline run it is "
    "compared with, by an exact McNemar test on their per-problem results where both logged "
    f"them, else by overlapping Wilson intervals (alpha = {ALPHA})."
)


def verdict(
    kind: str, runs: pd.DataFrame, baseline: str = BASELINE, miss_rate: str = MISS_RATE
) -> str:
    """What this data says about the paper's claim for figure `kind`: a line per run compared
    (per bit width for Table 1), each saving beside the accuracy it came with; a verdict that
    cannot be formed says why in one line."""
    fin = finished(runs)
    try:
        if kind == "table1":
            return table1.verdict(table1.cells(fin))
        if kind == "mrc":
            return f"{fin['stream'].nunique() if 'stream' in fin else 0} request streams."
        if kind == "fig10":
            return _warmup(fin)
        if kind == "optimality":
            return _optimality(fin)
        return _against_baseline(kind, fin, baseline, miss_rate)
    except Exception as err:  # the report goes on: the verdict is the reason it has none
        return f"no verdict: {type(err).__name__}: {err}".splitlines()[0]


def _warmup(fin: pd.DataFrame) -> str:
    by = fin.set_index("policy.warmup")
    if not {"empty", "pcw"} <= set(by.index):
        return "needs warmup=empty and warmup=pcw runs."
    twice = sorted(set(by.index[by.index.duplicated()]))
    if twice:
        differ = [
            field(c) for c in config_columns(fin)
            if field(c) not in ("policy.warmup", *EXECUTION) and text(fin[c]).nunique() > 1
        ]  # fmt: skip
        return (f"needs one run per warmup: warmup={', '.join(twice)} has several (they differ "
                f"in {', '.join(differ) or 'nothing: repeats'}).")  # fmt: skip
    empty, pcw = by.loc["empty"], by.loc["pcw"]
    energy, latency = (empty[c] / pcw[c] for c in PER_TOKEN)
    sign, test = accuracy_test(pcw, empty)
    best = "the best" if pcw["accuracy"] >= by["accuracy"].max() else "not the best"
    tie = " (tied: every warmup scores the same)" if by["accuracy"].nunique() == 1 else ""
    return (
        f"PCW: {energy:.2f}x lower decode energy and {latency:.2f}x speed-up over an empty cache, "
        f"at accuracy {pcw['accuracy']:.3f} vs {empty['accuracy']:.3f}: {WORDS[sign]} ({test}); "
        f"{best} accuracy of the {len(by)} warmups{tie}."
    )


def _optimality(fin: pd.DataFrame) -> str:
    """Per cache size, Belady's miss rate and the series closest to and farthest from it."""
    from sweep.report.figures import optimality_runs

    runs = optimality_runs(fin).assign(gap=lambda d: d["miss_rate"] - d["belady_miss_rate"])
    size = "cache_size" if "cache_size" in runs else "cache"
    lines = []
    for at, group in runs.sort_values(size).groupby("at", sort=False):
        group = group.sort_values("gap")
        belady = group["belady_miss_rate"]
        oracle = f"{belady.iloc[0]:.3f}" if belady.nunique() == 1 else "per stream"
        ranked = [f"{r['series']} +{r['gap']:.3f}" for _, r in group.iterrows()]
        lines.append(f"{at}: Belady {oracle}; closest to farthest: {', '.join(ranked)}.")
    return "\n".join(lines)


def _accuracy(r) -> str:
    """How a run's accuracy compares with its baseline run's, and by which test."""
    if r["accuracy_sign"] is None:
        return f"{r['accuracy_test']} with {r['baseline']}."
    text = f"accuracy {r['accuracy']:.3f} vs {r['accuracy_base']:.3f} for {r['baseline']}"
    if r["baseline_bits"]:
        text += f" (at {r['baseline_bits']})"
    if r["beyond"]:
        text += ", the most accurate baseline run (none was as accurate)"
    return f"{text}. {WORDS[r['accuracy_sign']].capitalize()}: {r['accuracy_test']}."


def _against_baseline(kind: str, fin: pd.DataFrame, baseline: str, miss_rate: str) -> str:
    """Figs. 8 and 9: each DBSC run against its matched baseline run, chosen by what is compared
    (the miss rate, the energy per token)."""
    needs = f"needs runs of {baseline} and of {' or '.join(DBSC)} at the same cache sizes."
    if not (fin["policy"] == baseline).any() or not fin["policy"].isin(DBSC).any():
        return needs
    norm = normalise(fin, baseline, by=miss_rate if kind == "fig8" else PER_TOKEN[0])
    ours = norm[norm["policy"].isin(DBSC)]
    lines, wins, lost, gains = [], 0, [], []
    size = "cache_size" if "cache_size" in ours else "cache"
    for _, r in ours.sort_values([size, "series"]).iterrows():
        where = f"{r['series']} at {r['at']}"
        if pd.isna(r["baseline"]):
            lines.append(f"{where}: no {baseline} run to compare with: {r['why']}.")
            continue
        matched = r["accuracy_sign"] in (0, 1)
        if kind == "fig8":
            x, xb = r[miss_rate], r[f"{miss_rate}_base"]
            saved = x < xb
            wins += saved and matched
            saving = f"{x:.3f} vs {xb:.3f}"
            if r["baseline_bits"] and "hbn" in miss_rate:
                saving += " (each per its own high-bit expert bytes)"
            lines.append(f"{where}: {miss_rate} {saving} ({'lower' if saved else 'not lower'}); "
                         f"{_accuracy(r)}")  # fmt: skip
        else:
            saved = r["energy_norm"] < 1
            wins += saved and r["latency_norm"] < 1 and matched
            saving = f"{1 / r['energy_norm']:.2f}x less energy"
            gains += [(1 / r["energy_norm"], 1 / r["latency_norm"])] if matched else []
            lines.append(f"{where}: {saving}, {1 / r['latency_norm']:.2f}x faster; {_accuracy(r)}")
        if saved and r["accuracy_sign"] == -1:
            lost.append(f"{where} ({saving} at accuracy {r['accuracy']:.3f} vs "
                        f"{r['accuracy_base']:.3f})")  # fmt: skip
    if kind == "fig8":
        head = (f"{wins} of {len(ours)} DBSC runs miss less ({miss_rate}) than their matched "
                "baseline at matched accuracy.")  # fmt: skip
        cost = "missed less"
    else:
        best = ""
        if gains:
            energy, time = (max(g) for g in zip(*gains))
            best = f"; the largest gains at matched accuracy {energy:.2f}x energy, {time:.2f}x time"
        head = (f"{wins} of {len(ours)} DBSC runs decode with less energy and time per token than "
                f"their matched baseline at matched accuracy{best}.")  # fmt: skip
        cost = "saved energy"
    bought = (f"{len(lost)} DBSC runs {cost} only by losing accuracy (less accurate than their "
              f"baseline run){': ' + '; '.join(lost) if lost else ''}.")  # fmt: skip
    return "\n".join([head, RULE, bought, *lines])
