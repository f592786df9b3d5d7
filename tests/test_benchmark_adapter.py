"""benchmarks/adapter_decode.py keeps running on the CPU (`--small --device cpu`): every path
of its table, the plain transformers one, the simulator before and after."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_decode_benchmark_runs_small_on_the_cpu(tmp_path):
    out = tmp_path / "rows.json"
    cmd = [sys.executable, "benchmarks/adapter_decode.py", "--small", "--device", "cpu",
           "--prompt", "16", "--steps", "2", "--batches", "1,2", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())
    paths = [(r["path"], r["batch"]) for r in rows]
    assert ("plain generate, dynamic KV", 1) in paths
    assert sum(p.startswith("simulator before") for p, _ in paths) == 1
    now = [r for r in rows if r["path"].startswith("simulator: device runtime")]
    assert [r["batch"] for r in now] == [1, 2]
    for r in rows:
        assert r["step_ms"] > 0 and r["tokens_per_s"] > 0
    assert all(0 < r["model_only_ms"] for r in now)
    assert "| simulator: device runtime" in proc.stdout  # the table
