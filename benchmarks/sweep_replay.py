"""One tiny-model grid swept twice, back to back: replayed from request streams and with the
model in the loop for every run. Prints both wall times, their ratio and whether all runs'
metrics agree (floats within 1e-9 relative, wall_s aside).

    python benchmarks/sweep_replay.py                    # 24 runs, 40 problems each
    python benchmarks/sweep_replay.py eval.limit=10      # extra overrides go to both sweeps

Grid: 3 cache sizes x 2 warmups x 2 hardware profiles x {lru_highbit, dbsc}. Each sweep uses
its own MLflow store in a temporary folder, so neither reuses the other's runs or streams.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GRID = [
    "cache=frac_10,frac_25,frac_50",
    "policy.warmup=lru,pcw",
    "hardware=mobile_lpddr4_ufs31,laptop_lpddr5_nvme",
    "policy=lru_highbit,dbsc",
]
REPO = Path(__file__).resolve().parent.parent


def sweep(folder: Path, replay: bool, extra: list[str]) -> float:
    args = [sys.executable, "-m", "sweep", "-m", *GRID, f"sweep.replay={str(replay).lower()}"]
    args += [f"mlflow.tracking_uri=sqlite:///{folder}/mlflow.db", f"hydra.sweep.dir={folder}/mr"]
    t0 = time.perf_counter()
    res = subprocess.run([*args, *extra], cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"sweep failed:\n{res.stderr[-3000:]}")
    return wall


def metrics(folder: Path) -> dict:
    import mlflow

    from sweep.jobs import RESULT_METRICS

    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["slicemoe"], filter_string="tags.role = 'run'")
    return {
        r["tags.run_key"]: {m: r[f"metrics.{m}"] for m in RESULT_METRICS if m != "wall_s"}
        for _, r in runs.iterrows()
    }


def main() -> None:
    extra = sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        a, b = Path(tmp) / "replay", Path(tmp) / "inloop"
        t_replay = sweep(a, True, extra)
        t_loop = sweep(b, False, extra)
        ma, mb = metrics(a), metrics(b)
    same = set(ma) == set(mb) and all(
        (math.isnan(x) and math.isnan(mb[k][m])) or math.isclose(x, mb[k][m], rel_tol=1e-9)
        for k, row in ma.items()
        for m, x in row.items()
    )
    print(f"runs: {len(ma)} replayed, {len(mb)} in the loop; all metrics agree: {same}")
    print(f"sweep.replay=true : {t_replay:7.1f} s")
    print(f"sweep.replay=false: {t_loop:7.1f} s")
    print(f"ratio in-loop / replay: {t_loop / t_replay:.2f}x")
    if not same:
        raise SystemExit("replayed and in-loop metrics differ")


if __name__ == "__main__":
    main()
