"""benchmarks/packing.py keeps running on the CPU (`--small --device cpu`), where configs packed
into one model pass record exactly what each records alone."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_packed_passes_equal_solo_ones_on_the_cpu(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("packing", ROOT / "benchmarks/packing.py")
    packing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(packing)
    row = packing.main(["--small", "--device", "cpu", "--json", str(tmp_path / "row.json")])
    assert row["configs"] == 2 and row["solo_s"] > 0 and row["packed_s"] > 0
    for name, r in row["per_config"].items():
        assert r["sequences_other_length"] == 0 and r["expert_choices_differing"] == 0, name
        assert all(r[f"{m}_difference"] == 0 for m in packing.COMPARED), name
    assert "| cumsum frac=0.1 | 0 | 0.00e+00 |" in capsys.readouterr().out
    assert not math.isnan(row["speedup"])
