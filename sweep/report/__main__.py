"""`python -m sweep.report`: the report of an experiment's runs (see sweep.report)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import sweep.report
from sweep.report.compare import BASELINE
from sweep.report.page import curves_of, write_report
from sweep.report.read import search, sweep_run_ids, tidy


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sweep.report", description=sweep.report.__doc__.split("\n\n")[0]
    )
    parser.add_argument("--experiment", required=True, help="MLflow experiment (mlflow.experiment)")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"),
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)",
    )
    parser.add_argument("--parent", help="only the runs of the sweep with this parent run id")
    parser.add_argument("--out", type=Path, help="output folder (default: report/<experiment>)")
    parser.add_argument(
        "--baseline", default=BASELINE, help="policy the per-token energy/latency are divided by"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    args = parser().parse_args(argv)
    runs = search(args.experiment, args.tracking_uri)
    if args.parent:
        runs = runs[runs["run_id"].isin(sweep_run_ids(args.parent))]
    df = tidy(runs)
    steps, curves = curves_of(df)
    out = args.out or Path("report") / args.experiment
    title = f"slicemoe: {args.experiment}"
    for path in write_report(df, out, args.baseline, steps, curves, title):
        print(path)


if __name__ == "__main__":
    main()
