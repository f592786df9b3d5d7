"""benchmarks/kernel_speed.py keeps running on the CPU (`--small --device cpu --sweep`, Triton's
interpreter): the tile kernels and the grouped GEMM on the same inputs agree, and the sweep
of tile shapes times each GEMM's shapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_kernel_benchmark_runs_small_on_the_cpu(tmp_path):
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, "benchmarks/kernel_speed.py", "--small", "--device", "cpu",
           "--sweep", "--json", str(out)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    gemms = result["experts"][:-1]
    assert [r["tokens"] for r in gemms] == [3, 96]
    for row in gemms:
        assert row["relative_diff"] < 1e-5 and row["tiles_ms"] > 0 and row["grouped_ms"] > 0
    assert result["experts"][-1]["dequantize_gate_up_both_paths_ms"] > 0
    # the sweep: both GEMMs over its two shapes, the one tile_shapes picks marked
    sweep = result["sweep"]
    assert [(r["kernel"], r["bn"]) for r in sweep] == [
        ("gate_up", 64),
        ("gate_up", 128),
        ("down", 64),
        ("down", 128),
    ]
    assert [r["chosen"] for r in sweep] == [True, False, True, False]
    assert all(r["tiles_us"] > 0 and r["pairs"] == 6 for r in sweep)
