"""benchmarks/gsm8k_pass.py keeps running on the CPU (`--small --device cpu`): a stand-in
checkpoint built from the shipped Qwen config, shrunk, a tokenizer trained on GSM8K, and the
record pass timed by phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "gsm8k"


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="GSM8K is not at ../shared/data/gsm8k")
def test_the_gsm8k_pass_runs_small_on_the_cpu(tmp_path):
    out = tmp_path / "row.json"
    cmd = [sys.executable, "benchmarks/gsm8k_pass.py", "--small", "--device", "cpu",
           "--limit", "3", "--max-new", "6", "--json", str(out)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["problems"] == 3 and row["batch_size"] == 3  # auto off CUDA (8), three problems
    assert row["decode_steps"] == 6 and row["prefill_tokens"] > 3 * 100  # 5-shot prompts
    for k in ("prefill_s", "decode_s", "end_s", "load_s", "decode_roofline_s", "prefill_flops"):
        assert row[k] > 0, k
    assert row["pass_s"] >= row["prefill_s"] + row["decode_s"] + row["end_s"]
    assert row["kv_bytes"] > 0 and row["weights_bytes"] > 0
    assert row["decode_bytes"] == 6 * row["weights_bytes"] + row["kv_bytes"]
    assert "| decode |" in proc.stdout and "| roofline decode |" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not DATA.is_dir(), reason="GSM8K is not at ../shared/data/gsm8k")
def test_one_batchs_recorded_step_is_timed_small_on_the_cpu(tmp_path):
    out, trace = tmp_path / "step.json", tmp_path / "trace.json"
    cmd = [sys.executable, "benchmarks/gsm8k_pass.py", "--small", "--device", "cpu",
           "--limit", "4", "--step", "2", "--step-from", "1", "--profile", "--json", str(out),
           "--trace", str(trace)]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())
    assert row["step_rows"] == 2 and row["step_from"] == 1 and not row["step_captured"]
    assert row["step_ms"] > 0 and row["step_slots"] > 100 + 47  # 5-shot prompts, 47 planned
    assert "2 rows (length ranks 1-2)" in proc.stdout
    # --profile: the step's ops (kernels on CUDA) by name, the longest first
    ops = row["step_kernels"]
    assert ops and all(a["ms"] >= b["ms"] for a, b in zip(ops, ops[1:]))
    assert any(k["name"] in ("aten::addmm", "aten::mm") for k in ops)
    assert "ops a step, over 4 steps" in proc.stdout
    # --trace: the profiled steps' events, each with its time and place, for a trace viewer
    events = json.loads(trace.read_text())["traceEvents"]
    timed = [e for e in events if e.get("ph") == "X" and e["name"] in ("aten::addmm", "aten::mm")]
    assert timed and all(e["dur"] >= 0 and "ts" in e and "tid" in e for e in timed)
