"""The AMAT table command on the shipped tiny model (a few windows of text it was trained on)."""

import pytest

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


def test_the_sweeps_table1_runs_measure_what_the_table1_command_does():
    """+experiment=paper_table1 measures each cell as a run of the simulator (every expert at
    one path), whose prefill (here one token per window) is at high precision, as in the
    paper's pipeline; slicemoe.table1 runs every token at the path measured."""
    from slicemoe.config import BitsConfig, PolicyConfig, RunConfig
    from slicemoe.eval import shipped
    from slicemoe.run import run
    from slicemoe.table1 import SAMPLE

    text = EvalConfig(task="wikitext", data_path=shipped(SAMPLE), seq_len=64, stride=64, limit=4)
    out, _ = table(None, text.data_path, seq_len=64, limit=4, batch=4)
    cells = [  # (bits, path, the cell, relative tolerance)
        (BitsConfig(high=6, low=3, symmetric=True, scheme="trunc"), "high", ("Sym", "trunc", 6, 3, 6), 1e-5),
        (BitsConfig(high=4, low=2, scheme="amat"), "low", ("AMAT", "amat", 4, 2, 2), 0.01),
        (BitsConfig(high=8, low=4, symmetric=True, scheme="trunc"), "low", ("Sym", "trunc", 8, 4, 4), 0.1),
    ]  # fmt: skip
    for bits, path, key, tol in cells:
        bits.nonexpert_bits = None  # Table 1 quantizes the experts alone
        cfg = RunConfig(bits=bits, policy=PolicyConfig(precision=path), eval=text, batch_size=4)
        assert run(cfg)["perplexity"] == pytest.approx(out[key], rel=tol), key
