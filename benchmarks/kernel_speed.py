"""The routed experts on codes (slicemoe.kernels.expert_gemm) at Qwen1.5-MoE-A2.7B shape, one
process: the tile kernels (dequantizing per tile) against the grouped GEMM on the layer
dequantized once, at a decode batch and at prefill pieces, in TFLOP/s, with the largest
relative difference of their outputs; and the dequantization alone.

    python benchmarks/kernel_speed.py                       # GPU
    python benchmarks/kernel_speed.py --small --device cpu  # CI: small shapes, Triton's interpreter
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

import torch


def bench(fn, device) -> float:
    """Seconds per call: triton's do_bench on CUDA, the best of three elsewhere."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn) / 1e3
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def experts(device, dtype, small: bool) -> list[dict]:
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from slicemoe.config import BitsConfig
    from slicemoe.kernels import expert_gemm
    from slicemoe.models import moe_blocks
    from slicemoe.models.adapter import quantize_model

    h, inter, e, k = (64, 32, 6, 2) if small else (2048, 1408, 60, 4)
    config = Qwen2MoeConfig(
        hidden_size=h, moe_intermediate_size=inter, num_experts=e, num_experts_per_tok=k,
        num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
        intermediate_size=2 * h, shared_expert_intermediate_size=2 * h, vocab_size=64,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantize_model(model, BitsConfig(), codes=True)
    ex = moe_blocks(model)[0].experts
    switch = expert_gemm.GROUPED_ROWS * e // k  # tokens from which a call takes the grouped GEMM
    rows = []
    for tokens in (3, 2 * switch) if small else (1, 147, 8192, 32768):
        x = torch.randn(tokens, h, device=device, dtype=dtype)
        idx = torch.stack([torch.randperm(e, device=device)[:k] for _ in range(min(tokens, 512))])
        idx = idx.repeat(-(-tokens // len(idx)), 1)[:tokens]
        w = torch.rand(tokens, k, device=device, dtype=dtype)
        flops = 2 * tokens * k * 3 * h * inter
        call = partial(expert_gemm.code_experts, ex, x, idx, w)
        times, outs = {}, {}
        threshold = expert_gemm.GROUPED_ROWS
        for name, rows_from in (("tiles", 2**62), ("grouped", 0)):
            expert_gemm.GROUPED_ROWS = rows_from
            try:
                times[name] = bench(call, device)
                outs[name] = call().float()
            finally:
                expert_gemm.GROUPED_ROWS = threshold
        diff = (outs["tiles"] - outs["grouped"]).norm() / outs["tiles"].norm()
        rows.append(dict(tokens=tokens, tiles_ms=1e3 * times["tiles"],
                         grouped_ms=1e3 * times["grouped"],
                         tiles_tflops=flops / times["tiles"] / 1e12,
                         grouped_tflops=flops / times["grouped"] / 1e12,
                         relative_diff=float(diff)))  # fmt: skip
    used = torch.ones(2 * e, dtype=torch.int64, device=device)
    low = (ex.shift, float(2**ex.shift), 0)
    call = partial(expert_gemm.dequantize, ex, "gate_up_proj", used, low, 0, 2 * e)
    rows.append(dict(dequantize_gate_up_both_paths_ms=1e3 * bench(call, device)))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="small shapes (the CPU: interpreter)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "experts": experts(device, dtype, a.small)}
    print(f"kernels on {name} ({dtype})")
    for row in result["experts"]:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()))  # fmt: skip
    sys.stdout.flush()
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
