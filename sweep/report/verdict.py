"""What a sweep's runs say of each claim of the paper (CLAIMS): the text beside every figure
and table of the report."""

from __future__ import annotations

import pandas as pd

from sweep.report import table1
from sweep.report.compare import BASELINE, interval, matched_baseline, normalise
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
}
DBSC = ("dbsc", "dbsc_pcw")


def _against(run, b, matched: bool | None) -> str:
    """How a run's accuracy compares with its matched baseline run's, in words."""
    text = f"accuracy {run['accuracy']:.3f} vs {b['accuracy']:.3f} for {b['series']}"
    if matched is not False:
        return text
    # No baseline run was as accurate as this one: is the gap more than noise?
    ci = interval(run)
    noise = "" if ci is None else (
        f"; {b['accuracy']:.3f} is {'within' if b['accuracy'] >= ci[0] else 'below'} this "
        f"run's 95 % interval {ci[0]:.3f}-{ci[1]:.3f}")  # fmt: skip
    return f"{text}, the most accurate baseline run (none was as accurate{noise})"


def verdict(kind: str, runs: pd.DataFrame, baseline: str = BASELINE) -> str:
    """What this data says about the paper's claim for figure `kind`: a line per run compared
    (per bit width for Table 1)."""
    fin = finished(runs)
    if kind == "table1":
        return table1.verdict(table1.cells(fin))
    if kind == "mrc":
        return f"{fin['stream'].nunique() if 'stream' in fin else 0} request streams."
    if kind == "fig10":
        by = fin.set_index("policy.warmup")
        if not {"empty", "pcw"} <= set(by.index):
            return "needs warmup=empty and warmup=pcw runs."
        e = (
            by.loc["empty", "energy_decode_j_per_token"]
            / by.loc["pcw", "energy_decode_j_per_token"]
        )
        lat = (
            by.loc["empty", "latency_decode_s_per_token"]
            / by.loc["pcw", "latency_decode_s_per_token"]
        )
        best = by["accuracy"].max()
        acc = "the best accuracy" if by.loc["pcw", "accuracy"] >= best else "not the best accuracy"
        tie = " (tied: every warmup scores the same)" if by["accuracy"].nunique() == 1 else ""
        return (f"PCW: {e:.2f}x lower decode energy and {lat:.2f}x speed-up over an empty cache; "
                f"{acc}{tie}.")  # fmt: skip
    norm = normalise(fin, baseline) if (fin["policy"] == baseline).any() else fin.iloc[0:0]
    ours = norm[norm["policy"].isin(DBSC) & norm["baseline"].notna()] if len(norm) else norm
    if ours.empty:
        return f"needs runs of {baseline} and of {' or '.join(DBSC)} at the same cache sizes."
    base = norm[norm["policy"] == baseline]
    lines, wins = [], 0
    for _, r in ours.sort_values(["cache_size", "series"]).iterrows():
        b, matched = matched_baseline(r, base)
        acc = _against(r, b, matched)
        if kind == "fig8":
            lower = r["miss_rate_refn"] < b["miss_rate_refn"]
            ci = interval(b)  # a loss of accuracy within the baseline's interval is noise
            wins += lower and (ci is None or r["accuracy"] >= ci[0])
            lines.append(f"{r['series']} at {r['cache']}: miss rate {r['miss_rate_refn']:.3f} vs "
                         f"{b['miss_rate_refn']:.3f} ({'lower' if lower else 'not lower'}), "
                         f"{acc}.")  # fmt: skip
        else:
            wins += r["energy_norm"] < 1 and r["latency_norm"] < 1
            lines.append(f"{r['series']} at {r['cache']}: {1 / r['energy_norm']:.2f}x less "
                         f"energy, {1 / r['latency_norm']:.2f}x faster; {acc}.")  # fmt: skip
    if kind == "fig8":
        head = (f"{wins} of {len(ours)} DBSC runs miss less than their matched baseline, at an "
                "accuracy within its 95 % interval or above.")  # fmt: skip
    else:
        gains = f"{1 / ours['energy_norm'].min():.2f}x / {1 / ours['latency_norm'].min():.2f}x"
        head = (f"{wins} of {len(ours)} DBSC runs decode with less energy and time per token "
                f"than their matched baseline; the largest gains {gains}.")  # fmt: skip
    return "\n".join([head, *lines])
