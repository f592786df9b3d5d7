"""Table 1 from runs on a text: each perplexity in the cell `slicemoe.table1` keys it by, the
table as a frame, and what it says of the paper's claim."""

from __future__ import annotations

import pandas as pd

from sweep.report.compare import number
from sweep.report.read import finished


def cells(runs: pd.DataFrame) -> dict:
    """Perplexities of runs on a text, keyed as `slicemoe.table1` keys them ((quantizer, scheme,
    h, l, bits), "fp"): top-k runs with every expert at the high-bit path fill that cell of each
    scheme of their quantizer (it does not depend on the scheme), runs at the low path their
    scheme's cell, and unquantized experts "fp"."""
    from slicemoe.table1 import ROWS

    out = {}
    for _, run in finished(runs).iterrows():
        if run.get("policy.routing", "topk") != "topk" or run["perplexity"] != run["perplexity"]:
            continue
        high, low = number(run["bits.high"]), number(run["bits.low"])
        path = run["policy.precision"]
        symmetric = str(run["bits.symmetric"]).lower() == "true"
        if high != high:
            if path == "high":
                out["fp"] = run["perplexity"]
            continue
        if low != low:
            continue
        h, l = int(high), int(low)
        for quantizer, scheme in ROWS:
            if (quantizer == "Sym") != symmetric:
                continue
            if path == "high" or (path == "low" and scheme == run["bits.scheme"]):
                out[(quantizer, scheme, h, l, h if path == "high" else l)] = run["perplexity"]
    return out


def frame(cells: dict) -> pd.DataFrame:
    from slicemoe.table1 import header, rows

    return pd.DataFrame(rows(cells), columns=header())


def verdict(cells: dict) -> str:
    """What Table 1's cells say of the paper's claim: a line per bit width."""
    from slicemoe.table1 import MATS

    lines, broken, close = [], 0, 0
    for h, l in MATS:
        amat = cells.get(("AMAT", "amat", h, l, l))
        base_asym = cells.get(("Asym", "base", h, l, l))
        if amat is None:
            continue
        parts = [f"MAT{h}{l} {l}-bit path: AMAT {amat:.4g}"]
        for quantizer in ("Asym", "Sym"):
            base = cells.get((quantizer, "base", h, l, l))
            if base is not None:
                parts.append(f"{quantizer} Base {base:.4g} (AMAT {amat / base:.2f}x)")
        trunc = [cells[k] for k in (("Asym", "trunc", h, l, l), ("Sym", "trunc", h, l, l))
                 if k in cells]  # fmt: skip
        if trunc:
            parts.append(f"Trunc {min(trunc):.4g} or worse ({min(trunc) / amat:.0f}x AMAT)")
        lines.append(", ".join(parts) + ".")
        broken += bool(trunc) and min(trunc) >= 10 * amat
        close += base_asym is not None and amat <= 1.1 * base_asym
    if not lines:
        return "needs low-path runs of AMAT (bits.scheme=amat, policy=lru_lowbit)."
    head = (f"At {broken} of {len(lines)} bit widths Trunc's low path is at least 10x AMAT's "
            f"perplexity; at {close} AMAT is within 10 % of Asym Base or better.")  # fmt: skip
    return "\n".join([head, *lines])
