"""The paper's grid of one real-size model through the sweep engine (Hydra, Ray, MLflow).

`+experiment=paper_grid_real` (Figs. 8-10 on GSM8K under both hardware profiles, Table 1 on
WikiText-2) on a random-weight checkpoint of Qwen1.5-MoE-A2.7B's shape with a GSM8K tokenizer
(built as benchmarks/gsm8k_pass.py does), in a scratch MLflow store; then `python -m sweep.report`
on it. Prints the wall time, the model passes and replays, and the share of the wall time a
model pass was running (the GPU busy), from the runs in the store.

    python benchmarks/paper_grid.py                          # GPU, GSM8K complete
    python benchmarks/paper_grid.py --limit 64               # 64 GSM8K problems (and windows)
    python benchmarks/paper_grid.py --small --device cpu     # the tiny model, a reduced grid (CI)

Arguments after `--` go to the sweep's command line (e.g. ray.address=...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared/data"  # gsm8k/ and wikitext-2/test.txt
QWEN = ROOT / "slicemoe/checkpoints/configs/qwen1.5-moe-a2.7b/config.json"
# --small: three of Fig. 8's policies (two cache-independent streams, one cache-aware) and
# Cache-Prior at one strength, one cache size, no Fig. 10, Table 1's asymmetric high-bit row at
# MAT84, short sequences: every kind of pass (cache-independent, cache-aware, perplexity), the
# four GSM8K ones packed into one. One GSM8K example in the prompt: five make prompts of ~3,200
# tokens, past the tiny model's 2,048 positions, whose prefill was most of each pass's time.
SMALL = [
    "model=tiny", "cache=frac_25", "policy.lam=0.2", "bits=mat84", "bits.symmetric=false",
    'hydra.sweeper.grids.fig8.policy="lru_lowbit,dbsc_pcw,cumsum"',
    "eval.limit=2", "eval.num_fewshot=1",
    "eval.max_new_tokens=8", "eval.seq_len=32", "eval.stride=32", "batch_size=2",
    "~hydra.sweeper.grids.fig10", "~hydra.sweeper.grids.table1_low_sym",
    "~hydra.sweeper.grids.table1_low_asym", "ray.object_store_mb=128", "sweep.optimality=true",
    "sweep.pack_rows=8",
]  # fmt: skip


def summary(uri: str, experiment: str, wall_s: float) -> dict:
    """Runs, passes, replays and GPU-busy share of the sweep, from its MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.role = 'run'", max_results=5000)
    tags = [r.data.tags for r in runs]
    # A pass is a recording (of several streams, packed), or a run with the model in the loop.
    recorded = {t["stream_pass"]: float(t["stream_record_s"]) for t in tags if "stream_pass" in t}
    passes = list(recorded.values())
    passes += [
        r.data.metrics.get("wall_s", 0.0) for r, t in zip(runs, tags) if "replayed_from" not in t
    ]
    return {
        "runs": len(runs),
        "finished": sum(r.info.status == "FINISHED" for r in runs),
        "passes": len(passes),
        "replays": sum("replayed_from" in t for t in tags),
        "streams": len({t["replayed_from"] for t in tags if "replayed_from" in t}),
        "pass_s": sum(passes),
        "wall_s": wall_s,
        "busy": sum(passes) / wall_s,
    }


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="the tiny model, a reduced grid")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--limit", type=int, help="GSM8K problems and WikiText windows (default all)")
    p.add_argument("--data", type=Path, default=DATA, help="holds gsm8k/ and wikitext-2/")
    p.add_argument("--out", type=Path, help="keep the store and figures here")
    p.add_argument("--checkpoint", type=Path, help="build (or reuse) it here (default: OUT)")
    p.add_argument("--json", type=Path, help="write the summary as JSON here")
    a = p.parse_args(argv)

    out = a.out or Path(tempfile.mkdtemp(prefix="paper-grid-"))
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out.resolve()}/mlflow.db"
    model = []
    build_s = 0.0
    if not a.small:
        import torch

        from benchmarks.gsm8k_pass import build_checkpoint

        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
        )
        folder = a.checkpoint or out / "checkpoint"
        t = time.perf_counter()
        if not (folder / "config.json").exists():
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            build_checkpoint(QWEN, a.data / "gsm8k", folder, False, device, dtype)
        build_s = time.perf_counter() - t
        model = ["model=qwen1.5-moe-a2.7b", f"model.path={folder}"]
    device = [] if a.device == "auto" else [f"model.device={a.device}"]
    limit = [] if a.limit is None else [f"eval.limit={a.limit}"]
    command = [
        sys.executable, "-m", "sweep", "-m", "+experiment=paper_grid_real", *model, *device,
        *(SMALL if a.small else []), *limit, f"mlflow.tracking_uri={uri}",
        "mlflow.experiment=paper_grid", f"hydra.sweep.dir={out}/multirun", *extra,
    ]  # fmt: skip
    env = {**os.environ, "SLICEMOE_DATA": str(a.data.resolve())}
    print(" ".join(command[1:]), flush=True)
    t = time.perf_counter()
    done = subprocess.run(command, cwd=out, env=env)
    wall_s = time.perf_counter() - t
    if done.returncode != 0:
        sys.exit(f"the sweep failed (exit {done.returncode}); its store: {uri}")
    t = time.perf_counter()
    report = subprocess.run(
        [sys.executable, "-m", "sweep.report", "--tracking-uri", uri, "--experiment",
         "paper_grid", "--out", str(out / "report")],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )  # fmt: skip
    if report.returncode != 0:
        sys.exit(f"the report failed: {report.stderr[-2000:]}")
    row = {
        **summary(uri, "paper_grid", wall_s),
        "build_s": build_s,
        "report_s": time.perf_counter() - t,
        "figures": sorted(f.name for f in (out / "report").glob("*.png")),
        "out": str(out),
    }
    print(
        f"paper grid ({'tiny, reduced' if a.small else 'qwen1.5-moe-a2.7b shape'}): "
        f"{row['runs']} runs ({row['finished']} FINISHED) in {wall_s:.1f} s; "
        f"{row['passes']} model passes ({row['pass_s']:.1f} s, {100 * row['busy']:.0f} % of the "
        f"wall time), {row['replays']} replays of {row['streams']} streams; report "
        f"{row['report_s']:.1f} s, {len(row['figures'])} figures; checkpoint built in "
        f"{build_s:.1f} s",
        flush=True,
    )
    if a.json:
        a.json.write_text(json.dumps(row, indent=1))
    return row


if __name__ == "__main__":
    main()
