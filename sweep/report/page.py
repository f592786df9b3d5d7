"""The report as files: every section (a figure or Table 1 of one setting), runs.csv and a
self-contained index.html with each section beside the paper's claim and the runs behind it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from sweep.report import figures, table1
from sweep.report.compare import BASELINE, MISS_RATE
from sweep.report.group import describe, differences, main_warmups, settings, warmup_groups
from sweep.report.read import finished, miss_ratio_curves, step_curves
from sweep.report.verdict import CLAIMS, verdict

RUN_COLUMNS = [
    "run", "policy", "policy.lam", "policy.tau", "bits", "bits.symmetric", "bits.scheme",
    "cache", "eviction", "policy.warmup", "accuracy", "perplexity", "eval.limit",
    "miss_rate_hbn", "miss_rate_refn", "belady_miss_rate", "belady_gap",
    "energy_decode_j_per_token", "latency_decode_s_per_token", "run_id",
]  # fmt: skip


@dataclass
class Section:
    """One figure or table of the report: `make()` returns the matplotlib figure, or for
    `table1` the cells (`table1.cells`); `verdict()` what its runs say of the paper's claim."""

    name: str  # the file it is written to
    kind: str  # a key of CLAIMS
    desc: str  # the setting it belongs to
    runs: pd.DataFrame  # every run behind it
    make: Callable[[], Any]
    verdict: Callable[[], str]
    differ: str = ""  # the config fields its runs differ in, and what the figure makes of each


def sections(
    df: pd.DataFrame,
    baseline: str = BASELINE,
    steps: dict | None = None,
    curves: dict | None = None,
    miss_rate: str = MISS_RATE,
) -> list[Section]:
    """Every figure and table for the settings of `df` (`settings`); a file name that comes
    again (another setting, another warmup group) is numbered from its second on. `steps`: run
    id -> miss_rate_step curve (warmup figures); `curves`: run id -> the miss-ratio curve table
    of the stream it recorded; `miss_rate`: the metric of Fig. 8's x axis and verdict."""
    from collections import Counter

    from slicemoe.eval import get_task

    seen: Counter = Counter()

    def name(stem: str, ext: str = "png") -> str:
        seen[stem] += 1
        return f"{stem}{'' if seen[stem] == 1 else f'_{seen[stem]}'}.{ext}"

    def judge(kind: str, runs: pd.DataFrame) -> Callable[[], str]:
        return lambda: verdict(kind, runs, baseline, miss_rate)

    out = []
    for desc, group in settings(df):
        if get_task(str(group["task"].iloc[0])).kind == "loglik":
            out.append(Section(name("table1", "md"), "table1", desc, group,
                               lambda g=group: table1.cells(g), judge("table1", group)))  # fmt: skip
            continue
        kept, folded = main_warmups(group)
        note = f"{desc} ({folded} runs of other warmups: see the warmup figure)" if folded else desc
        differ = differences(kept)
        out += [
            Section(name("accuracy_vs_miss_rate"), "fig8", note, kept,
                    lambda g=kept, d=note: figures.plot_accuracy_vs_miss_rate(
                        g, title=d, x=miss_rate, baseline=baseline),
                    judge("fig8", kept), differ),
            Section(name("energy_latency"), "fig9", note, kept,
                    lambda g=kept: figures.plot_energy_latency(g, baseline), judge("fig9", kept),
                    differ),
        ]  # fmt: skip
        for label, runs in warmup_groups(group):
            where = f"{desc} {label}".strip()
            out.append(Section(name("warmup"), "fig10", where, runs,
                               lambda r=runs, t=where: figures.plot_warmup(r, steps or {}, t),
                               judge("fig10", runs), "policy.warmup (the comparison)"))  # fmt: skip
        out.append(Section(name("miss_ratio_curves"), "mrc", desc, group,
                           lambda g=group, d=desc: figures.plot_miss_ratio_curves(
                               g, curves or {}, d, miss_rate),
                           judge("mrc", group)))  # fmt: skip
        if "belady_miss_rate" in group and group["belady_miss_rate"].notna().any():
            out.append(Section(name("optimality_gap"), "optimality", desc, group,
                               lambda g=group, d=desc: figures.plot_optimality_gap(g, d),
                               judge("optimality", group)))  # fmt: skip
    return out


def write_html(out: Path, title: str, summary: str, written: list[tuple[Section, Any]]) -> Path:
    """A self-contained `index.html`: per figure or table (each with what its `make` made), the
    paper's claim, what the data says, the figure (embedded) or table, and every run behind it."""
    import base64
    import html

    parts = [f"<h1>{html.escape(title)}</h1><pre>{html.escape(summary)}</pre>"]
    for s, made in written:
        if s.kind == "table1":
            body = table1.frame(made).to_html(index=False, na_rep="-", float_format="%.4g")
            if "fp" in made:
                body += f"<p>unquantized experts: {made['fp']:.4g}</p>"
        else:
            image = base64.b64encode((out / s.name).read_bytes()).decode()
            body = f'<img alt="{html.escape(s.name)}" src="data:image/png;base64,{image}">'
        lines = "".join(f"<li>{html.escape(line)}</li>" for line in s.verdict().splitlines())
        differ = f"<p><b>Runs differ in:</b> {html.escape(s.differ)}</p>" if s.differ else ""
        columns = [c for c in RUN_COLUMNS if c in s.runs and s.runs[c].notna().any()]
        table = s.runs[columns].to_html(index=False, float_format="%.4g")
        parts.append(
            f"<h2>{html.escape(s.name)}{' - ' + html.escape(s.desc) if s.desc else ''}</h2>"
            f"<p><b>Paper:</b> {html.escape(CLAIMS[s.kind])}</p>{differ}"
            f"<p><b>This data:</b></p><ul>{lines}</ul>{body}"
            f"<details><summary>the {len(s.runs)} runs behind it</summary>{table}</details>"
        )  # fmt: skip
    page = out / "index.html"
    page.write_text(
        "<!doctype html><meta charset='utf-8'><title>slicemoe report</title>"
        "<style>body{font-family:sans-serif;max-width:1500px;margin:auto}img{max-width:100%}"
        "table{font-size:12px;border-collapse:collapse}td,th{padding:2px 6px}</style>"
        + "".join(parts)
    )
    return page


def write_report(
    df: pd.DataFrame,
    out: Path,
    baseline: str = BASELINE,
    steps: dict | None = None,
    curves: dict | None = None,
    title: str = "slicemoe report",
    miss_rate: str = MISS_RATE,
) -> list[Path]:
    """runs.csv, every section (`sections`) as a file, and index.html with all of them; what
    was grouped and left out goes to stderr and to the page."""
    import matplotlib.pyplot as plt

    from slicemoe.table1 import format_table

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "runs.csv"]
    df.drop(columns="correct", errors="ignore").to_csv(paths[0], index=False)
    summary = describe(df, settings(df))
    print(summary, file=sys.stderr)
    if finished(df).empty:
        print("no finished runs: wrote runs.csv only", file=sys.stderr)
        return paths
    written = []
    for s in sections(df, baseline, steps, curves, miss_rate):
        try:
            made = s.make()
        except ValueError as err:
            print(f"{s.name} skipped: {err}", file=sys.stderr)
            continue
        if s.kind == "table1":
            csv = out / s.name.replace(".md", ".csv")
            (out / s.name).write_text(format_table(made) + "\n")
            table1.frame(made).to_csv(csv, index=False)
            paths += [out / s.name, csv]
        else:
            made.savefig(out / s.name, dpi=110)
            plt.close(made)
            paths.append(out / s.name)
        written.append((s, made))
    paths.append(write_html(out, title, summary, written))
    return paths


def curves_of(df: pd.DataFrame) -> tuple[dict, dict]:
    """The per-step miss rates of the warmup comparisons' runs and the miss-ratio curves of
    the runs that recorded a stream: the curves `sections` draws, from the tracking store."""
    from slicemoe.eval import get_task

    warm = [g for _, s in settings(df) for _, g in warmup_groups(s)]
    steps = step_curves(pd.concat(warm)["run_id"]) if warm else {}
    recorded = finished(df)
    if "stream_source" in recorded:
        # as `sections`: text runs (Table 1) show no miss-ratio curves
        texts = recorded["task"].map(lambda t: get_task(str(t)).kind == "loglik")
        recorded = recorded[(recorded["stream_source"] == "recorded") & ~texts]
        return steps, miss_ratio_curves(recorded["run_id"])
    return steps, {}
