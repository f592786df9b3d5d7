"""The routed experts on codes (slicemoe.kernels.expert_gemm) at Qwen1.5-MoE-A2.7B shape, one
process: the tile kernels (dequantizing per tile) against the grouped GEMM on the layer
dequantized once, at a decode batch and at prefill pieces, in TFLOP/s, with the largest
relative difference of their outputs; and the dequantization alone. `--sweep`: the tile
kernels at decode batches (128 and 259 tokens) over tile shapes and warps, each GEMM's shape
varied in turn, the shapes `expert_gemm.tile_shapes` picks marked `chosen`.

    python benchmarks/kernel_speed.py [--sweep]                     # GPU
    python benchmarks/kernel_speed.py --small --device cpu --sweep  # CI: Triton's interpreter
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
    """Seconds per call: triton's do_bench on CUDA; elsewhere one call (Triton's interpreter:
    the CPU mode shows that every path runs, its times say nothing of a GPU's)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def code_layer(device, dtype, small: bool):
    """A random Qwen1.5-MoE-shaped (or small) layer's experts as codes: (CodeExperts, k)."""
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    from slicemoe.config import BitsConfig
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
    return moe_blocks(model)[0].experts, k


def routed(tokens: int, h: int, e: int, k: int, device, dtype):
    """Random inputs of a layer's experts: hidden [T, H], k distinct experts a token, weights."""
    x = torch.randn(tokens, h, device=device, dtype=dtype)
    idx = torch.stack([torch.randperm(e, device=device)[:k] for _ in range(min(tokens, 512))])
    idx = idx.repeat(-(-tokens // len(idx)), 1)[:tokens]
    return x, idx, torch.rand(tokens, k, device=device, dtype=dtype)


def experts(device, dtype, small: bool) -> list[dict]:
    from slicemoe.kernels import expert_gemm

    ex, k = code_layer(device, dtype, small)
    e, inter, h = ex.num_experts, ex.gate_up_proj_q.shape[2] // 2, ex.gate_up_proj_q.shape[3]
    rows = []
    # Each call is made to take either path below, so the small mode's second batch need not
    # reach the grouped GEMM's threshold (in Triton's interpreter that would take ~30 s).
    for tokens in (3, 96) if small else (1, 147, 8192, 32768):
        x, idx, w = routed(tokens, h, e, k, device, dtype)
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
    low = expert_gemm.low_path(ex)
    call = partial(expert_gemm.dequantize, ex, "gate_up_proj", used, low, 0, 2 * e)
    rows.append(dict(dequantize_gate_up_both_paths_ms=1e3 * bench(call, device)))
    return rows


def sweep(device, dtype, small: bool) -> list[dict]:
    """The tile kernels at decode batches over tile shapes: one GEMM's shape varied at a time,
    the other at `tile_shapes`' choice, each row the whole `tiles` call; `chosen` marks the
    shape `tile_shapes` picks."""
    from slicemoe.kernels import expert_gemm

    ex, k = code_layer(device, dtype, small)
    e, h, g = ex.num_experts, ex.gate_up_proj_q.shape[3], ex.bits.group
    low = expert_gemm.low_path(ex)
    grid = [(64, 128, 3, 4), (128, 128, 3, 4)] if small else [
        (n, bk, stages, warps)
        for n in (64, 128) for bk in (64, 128) for stages in (3, 4) for warps in (4, 8)
    ]  # fmt: skip
    rows = []
    for tokens in (3,) if small else (128, 259):
        x, idx, w = routed(tokens, h, e, k, device, dtype)
        v, weights = idx.reshape(-1), w.reshape(-1).contiguous()
        bm, gate_up, down = expert_gemm.tile_shapes(v.numel(), e, g)
        for kernel, which in (("gate_up", 0), ("down", 1)):
            for shape in grid:
                shapes = (bm, shape, down) if which == 0 else (bm, gate_up, shape)
                call = partial(expert_gemm.tiles, ex, x, v, weights, k, low, shapes)
                rows.append(dict(tokens=tokens, pairs=v.numel(), kernel=kernel, bn=shape[0],
                                 bk=shape[1], stages=shape[2], warps=shape[3],
                                 chosen=shape == (gate_up, down)[which],
                                 tiles_us=1e6 * bench(call, device)))  # fmt: skip
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="small shapes (the CPU: interpreter)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, help="write the rows as JSON here")
    p.add_argument("--sweep", action="store_true", help="also time the tile kernels' shapes")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type != "cuda":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "experts": experts(device, dtype, a.small)}
    if a.sweep:
        result["sweep"] = sweep(device, dtype, a.small)
    print(f"kernels on {name} ({dtype})")
    for row in result["experts"] + result.get("sweep", []):
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()))  # fmt: skip
    sys.stdout.flush()
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
