"""The Triton kernels compile to Hopper (sm_90) machine code, ahead of time and without a GPU,
so a kernel that Triton's interpreter runs (test_cache_conformance.py, test_code_experts.py)
but its compiler would refuse fails here. Skipped where Triton is absent (CPU installs)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_the_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("hopper_kernels.py")
    # The script's folder, not the current one, leads its sys.path: name this checkout's code.
    paths = [str(script.parents[1]), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    compiled = [line for line in proc.stdout.splitlines() if line.startswith("compiled ")]
    # 3 cache step variants, 2 GEMMs x 4 tiles, the prefill's dequantization, the pairs' rows,
    # norm, rotary, top-k
    assert len(compiled) == 3 + 2 * 4 + 1 + 1 + 3, proc.stdout
