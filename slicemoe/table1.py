"""The AMAT comparison table (SliceMoE Table 1) for any local MoE checkpoint.

Expert-only quantization (group 32; everything else as loaded): WikiText perplexity of the
high-bit path and of the low path under each scheme, for Sym/Asym x Base/Trunc and AMAT, at
MAT42, MAT63 and MAT84. No cache is involved: every expert runs at the path being measured.

    python -m slicemoe.table1                     # the shipped head of WikiText-2 test
    python -m slicemoe.table1 --data ../shared/data/wikitext-2/test.txt
    python -m slicemoe.table1 --model /path/to/Qwen1.5-MoE-A2.7B --data test.txt --device cuda

The sweep measures the same table as MLflow runs (`+experiment=paper_table1`, one run per path
through the simulator), and `sweep.report.page` lays them out with `format_table`.
"""

from __future__ import annotations

import argparse
import math

import torch

from slicemoe import quant
from slicemoe.config import EvalConfig
from slicemoe.eval import shipped
from slicemoe.eval.wikitext import windows
from slicemoe.models import moe_blocks, resolve_path

ROWS = [("Sym", "base"), ("Sym", "trunc"), ("Asym", "base"), ("Asym", "trunc"), ("AMAT", "amat")]
MATS = [(4, 2), (6, 3), (8, 4)]
SAMPLE = "wikitext-2-test-head.txt"  # slicemoe/eval/data


@torch.no_grad()
def perplexity(model, wins, batch: int, device) -> float:
    nll, n = 0.0, 0
    for i in range(0, len(wins), batch):
        chunk = wins[i : i + batch]
        s = max(len(w.input_ids) for w in chunk)
        ids = torch.zeros(len(chunk), s, dtype=torch.long)
        keep = torch.zeros(len(chunk), s, dtype=torch.bool)
        for j, w in enumerate(chunk):
            ids[j, : len(w.input_ids)] = torch.tensor(w.input_ids)
            keep[j, max(w.n_context, 1) : len(w.input_ids)] = True
        logits = model(input_ids=ids.to(device), output_router_logits=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1)
        tok_lp = logp.gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        mask = keep[:, 1:].to(device)
        nll -= float(tok_lp[mask].sum())
        n += int(mask.sum())
    return math.exp(nll / n)


def set_experts(model, originals, h=None, l=None, sym=False, scheme="amat") -> None:
    """Experts at the high-bit path (l=None), the low path of `scheme`, or as loaded (h=None)."""

    def path(w):
        if h is None:
            return w
        qt = quant.quantize(w, h, 32, sym)
        return (qt if l is None else quant.low_path(w, qt, l, scheme)).dequantize(w.dtype)

    for block, (gu, dn) in zip(moe_blocks(model), originals):
        block.experts.gate_up_proj.data = path(gu)
        block.experts.down_proj.data = path(dn)


def table(model_path, data, seq_len=256, limit=None, batch=8, device="cpu", dtype="float32"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_path(model_path)
    tok = AutoTokenizer.from_pretrained(path)
    model = (
        AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), use_kernels=False)
        .to(device)
        .eval()
    )
    ecfg = EvalConfig(task="wikitext", data_path=data, seq_len=seq_len, stride=seq_len, limit=limit)
    wins = windows(ecfg, tok)
    originals = [
        (b.experts.gate_up_proj.data.clone(), b.experts.down_proj.data.clone())
        for b in moe_blocks(model)
    ]
    out = {"fp": perplexity(model, wins, batch, device)}
    for h, l in MATS:
        # The high-bit path depends only on the quantizer, so each is measured once.
        for sym in (True, False):
            set_experts(model, originals, h, None, sym)
            high = perplexity(model, wins, batch, device)
            for quantizer, scheme in ROWS:
                if (quantizer == "Sym") == sym:
                    out[(quantizer, scheme, h, l, h)] = high
                    set_experts(model, originals, h, l, sym, scheme)
                    out[(quantizer, scheme, h, l, l)] = perplexity(model, wins, batch, device)
    set_experts(model, originals)
    return out, len(wins)


def header() -> list[str]:
    return ["quant", "scheme"] + [f"MAT{h}{l} {b}b" for h, l in MATS for b in (h, l)]


def rows(out) -> list[list]:
    """The table's rows: perplexities keyed (quantizer, scheme, h, l, bits) in `out`, None where
    a cell was not measured."""
    return [
        [quantizer, scheme]
        + [out.get((quantizer, scheme, h, l, b)) for h, l in MATS for b in (h, l)]
        for quantizer, scheme in ROWS
    ]


def format_table(out) -> str:
    """Markdown; `out["fp"]`, when present, is the perplexity with experts as loaded."""
    lines = ["| " + " | ".join(header()) + " |", "|" + "---|" * len(header())]
    for row in rows(out):
        cells = row[:2] + ["-" if v is None else f"{v:.4g}" for v in row[2:]]
        lines.append("| " + " | ".join(cells) + " |")
    fp = out.get("fp")
    return "\n".join(lines) + ("" if fp is None else f"\n\nunquantized experts: {fp:.4g}")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m slicemoe.table1",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--model", default=None, help="local HF checkpoint (default: the shipped tiny model)"
    )
    ap.add_argument(
        "--data", default=None, help=f"WikiText-2 test text file (default: the shipped {SAMPLE})"
    )
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--limit", type=int, default=None, help="first N windows only")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    return ap


def main():
    a = parser().parse_args()
    data = a.data or shipped(SAMPLE)
    out, n = table(a.model, data, a.seq_len, a.limit, a.batch, a.device, a.dtype)
    print(f"WikiText perplexity over {n} windows of {a.seq_len} tokens of {data}\n")
    print(format_table(out))


if __name__ == "__main__":
    main()
