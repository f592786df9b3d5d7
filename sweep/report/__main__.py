"""`python -m sweep.report`: the report of an experiment's runs (see sweep.report)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import sweep.report
from sweep.jobs import RESULT_METRICS
from sweep.report.compare import BASELINE, MISS_RATE
from sweep.report.page import curves_of, write_report
from sweep.report.read import load


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
    miss_rates = [m for m in RESULT_METRICS if m.startswith("miss_rate")]
    parser.add_argument(
        "--miss-rate",
        default=MISS_RATE,
        type=lambda name: name if name.startswith("miss_rate") else f"miss_rate_{name}",
        choices=miss_rates,
        metavar="|".join(m.removeprefix("miss_rate_") for m in miss_rates),
        help="Fig. 8's miss rate, a metric miss_rate_NAME or miss_rate (slicemoe.metrics.DOCS; "
        f"default: {MISS_RATE.removeprefix('miss_rate_')}, the paper's high-bit-normalised one)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    args = parser().parse_args(argv)
    df = load(args.experiment, args.tracking_uri, args.parent)
    steps, curves = curves_of(df)
    out = args.out or Path("report") / args.experiment
    title = f"slicemoe: {args.experiment}"
    for path in write_report(df, out, args.baseline, steps, curves, title, args.miss_rate):
        print(path)


if __name__ == "__main__":
    main()
