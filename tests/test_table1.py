"""The AMAT table command on the shipped tiny model (a few windows of text it was trained on)."""

from slicemoe.config import EvalConfig
from slicemoe.eval.arith import docs
from slicemoe.table1 import MATS, ROWS, format_table, table


def test_table1_shows_the_amat_pattern(tmp_path):
    text = "\n\n".join(d.prompt for d in docs(EvalConfig(limit=2), None))
    path = tmp_path / "text.txt"
    path.write_text(text)
    out, n = table(None, str(path), seq_len=128, limit=4)
    assert n == 4
    for h, l in MATS:
        amat, trunc = out[("AMAT", "amat", h, l, l)], out[("Asym", "trunc", h, l, l)]
        base = out[("Asym", "base", h, l, l)]
        # Trunc destroys the low path; AMAT stays within reach of independent quantization.
        assert trunc > 10 * amat
        assert amat < 2 * base
        assert out[("AMAT", "amat", h, l, h)] < 1.1 * out["fp"]
    printed = format_table(out)
    assert all(f"| {q} | {s} |" in printed for q, s in ROWS)
