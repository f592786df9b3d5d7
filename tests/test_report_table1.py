"""sweep.report.table1: Table 1's cells from perplexity runs, its frame and its verdict."""

from __future__ import annotations

from report_tables import table1_rows

from sweep.report import table1


def test_table1_from_perplexity_runs():
    cells = table1.cells(table1_rows())
    assert cells["fp"] == 3.9
    # The high-bit path fills every scheme of its quantizer; AMAT is the asymmetric one.
    assert cells[("Sym", "base", 4, 2, 4)] == cells[("Sym", "trunc", 4, 2, 4)] == 5.04
    assert cells[("AMAT", "amat", 8, 4, 8)] == cells[("Asym", "base", 8, 4, 8)] == 4.08
    assert cells[("Asym", "trunc", 4, 2, 2)] == 500.02 and cells[("AMAT", "amat", 4, 2, 2)] == 5.52
    assert cells[("Sym", "base", 8, 4, 4)] == 6.04  # not the cache-aware run's 9.0
    assert not [k for k in cells if k != "fp" and k[0] == "Sym" and k[1] == "amat"]
    assert ("AMAT", "amat", 6, 3, 3) not in cells  # MAT63 was not run
    frame = table1.frame(cells)
    assert list(frame.columns[:4]) == ["quant", "scheme", "MAT42 4b", "MAT42 2b"]
    assert len(frame) == 5


def test_table1_verdict_compares_trunc_and_base_with_amat_per_bit_width():
    text = table1.verdict(table1.cells(table1_rows()))
    assert text.startswith("At 2 of 2 bit widths Trunc's low path is at least 10x AMAT's")
    assert "MAT42 2-bit path: AMAT 5.52, Asym Base 5.02 (AMAT 1.10x), Sym Base 6.02" in text
    assert "Trunc 500 or worse (91x AMAT)" in text
