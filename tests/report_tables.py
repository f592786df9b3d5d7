"""Run tables as sweep.report.read.tidy leaves them, for the report tests: no MLflow, no model."""

from __future__ import annotations

import itertools

import pandas as pd


def report_rows(**fixed):
    """Finished runs of two policies at two cache sizes, as sweep.report.read.tidy leaves them."""
    rows = []
    for policy, (cache, size) in itertools.product(
        ("cache_prior_highbit", "dbsc"), (("frac_25", 1e6), ("frac_50", 2e6))
    ):
        good = policy == "dbsc"
        rows.append(dict(
            run=f"{policy} {cache}", status="FINISHED", model="tiny", bits="mat84",
            hardware="h", task="arith", policy=policy, cache=cache, cache_size=size,
            seed=0, **{"eval.limit": 40, "policy.tau": 0.5, "model.device": "cpu"},
            accuracy=0.7 if good else 0.6, miss_rate_hbn=0.1 if good else 0.2,
            miss_rate_refn=0.1 if good else 0.2,
            energy_decode_j_per_token=1.0 if good else 2.0, latency_decode_s_per_token=1.0,
        ) | fixed)  # fmt: skip
    return rows


def lam_rows():
    """The baseline at three strengths (more lam: cheaper, less accurate) and three runs."""
    rows = report_rows()[:1]
    base = rows[0] | {"cache": "frac_25", "cache_size": 1e6}
    rows = [
        base | {"run": f"cp lam={lam}", "policy.lam": lam, "accuracy": acc,
                "energy_decode_j_per_token": e, "latency_decode_s_per_token": e / 2}
        for lam, acc, e in ((0.05, 0.75, 3.0), (0.2, 0.70, 2.0), (0.5, 0.30, 1.0))
    ]  # fmt: skip
    for policy, acc in (("dbsc", 0.70), ("dbsc_pcw", 0.80), ("lru_lowbit", 0.20)):
        rows.append(base | {"run": policy, "policy": policy, "policy.lam": 0.0, "accuracy": acc,
                            "energy_decode_j_per_token": 1.0, "latency_decode_s_per_token": 1.0})  # fmt: skip
    return pd.DataFrame(rows)


def table1_rows():
    """Perplexity runs as paper_table1 makes them, plus runs Table 1 has no cell for."""
    base = dict(
        status="FINISHED", model="tiny", task="wikitext", hardware="h", cache="frac_25",
        cache_size=1e6, seed=0, **{"eval.limit": 16, "policy.routing": "topk"},
    )  # fmt: skip
    rows = []
    for (h, l), sym in itertools.product(((4, 2), (8, 4)), (True, False)):
        bits = {"bits": f"mat{h}{l}", "bits.high": str(h), "bits.low": str(l),
                "bits.symmetric": str(sym)}  # fmt: skip
        rows.append(base | bits | {"policy": "lru_highbit", "policy.precision": "high",
                                   "bits.scheme": "amat", "perplexity": 4.0 + h / 100 + sym})  # fmt: skip
        for scheme in ("base", "trunc", "amat"):
            ppl = {"base": 5.0, "trunc": 500.0, "amat": 5.5}[scheme] + sym
            rows.append(base | bits | {"policy": "lru_lowbit", "policy.precision": "low",
                                       "bits.scheme": scheme, "perplexity": ppl + l / 100})  # fmt: skip
    fp = {"bits": "fp16", "bits.high": "null", "bits.low": "null", "bits.symmetric": "False"}
    rows.append(base | fp | {"policy": "lru_highbit", "policy.precision": "high",
                             "bits.scheme": "amat", "perplexity": 3.9})  # fmt: skip
    # Not a Table 1 cell: cache-aware routing changes which experts run.
    rows.append(rows[1] | {"policy.routing": "cache_prior", "policy": "cp", "perplexity": 9.0})
    return pd.DataFrame(rows)


def warmup_rows():
    """report_rows once with warmup=empty and once with warmup=pcw, each with a run id."""
    return [
        r | {"run_id": f"r{i}", "policy.warmup": w, "miss_rate": 0.2}
        for i, (r, w) in enumerate(zip(report_rows() * 2, ["empty"] * 4 + ["pcw"] * 4))
    ]


def stream_rows():
    """report_rows replayed from a stream per policy; r0 recorded the baseline's."""
    rows = [
        r | {"run_id": f"r{i}", "stream": r["policy"], "stream_source": "replayed"}
        for i, r in enumerate(report_rows())
    ]
    rows[0]["stream_source"] = "recorded"
    return rows


CURVE = pd.DataFrame({"cache_capacity_bytes": [5e5, 1e6, 2e6], "miss_rate_refn": [0.4, 0.2, 0.1]})


def against(dbsc: dict, *baselines: dict, **fixed) -> pd.DataFrame:
    """One DBSC run and baseline runs at frac_25, each the report_rows run with these changes."""
    base, ours = report_rows(**fixed)[0], report_rows(**fixed)[2]
    rows = [base | {"run": f"cp {i}"} | b for i, b in enumerate(baselines)]
    return pd.DataFrame([*rows, ours | dbsc])


def log_runs(uri: str, experiment: str, rows: list[dict], problems: dict) -> list[str]:
    """`rows` as the sweep logs runs to MLflow (config fields as params, results as metrics,
    tags role=run and a run key each), and problems.json for row i where `problems[i]` is its
    per-problem results. Returns the run ids."""
    import mlflow

    from sweep.jobs import RESULT_METRICS
    from sweep.report.group import field

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    ids = []
    for i, row in enumerate(rows):
        with mlflow.start_run(run_name=row["run"]) as run:
            mlflow.set_tags({"role": "run", "run_key": f"key{i}"})
            for name, value in row.items():
                if name == "cache_size":
                    mlflow.log_metric("cache_capacity_bytes", value)
                elif name in RESULT_METRICS:
                    mlflow.log_metric(name, value)
                elif name not in ("run", "status"):
                    mlflow.log_param(field(name), value)
            if i in problems:
                mlflow.log_dict({"correct": problems[i]}, "problems.json")
        ids.append(run.info.run_id)
    return ids


def optimality_rows():
    """DBSC at two cache sizes under three evictions, each set beside Belady's oracle on its
    stream (slicemoe.optimality), and one in-loop run without it."""
    rows = []
    for (cache, size, belady), (eviction, extra) in itertools.product(
        (("frac_25", 1e6, 0.10), ("frac_50", 2e6, 0.04)),
        (("belady", 0.0), ("lru", 0.05), ("fifo", 0.08)),
    ):
        rows.append(report_rows()[2] | {
            "run": f"dbsc {cache} {eviction}", "cache": cache, "cache_size": size,
            "eviction": eviction, "miss_rate": belady + extra, "belady_miss_rate": belady,
            "belady_gap": extra,
        })  # fmt: skip
    rows.append(report_rows()[0] | {"run": "in the loop", "miss_rate": 0.3})
    return rows
