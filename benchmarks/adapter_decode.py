"""Simulated decode throughput of the adapter at Qwen1.5-MoE-A2.7B shape vs plain HF generate.

Random weights from the model's config (no checkpoint needed). Measured in one process:
1. plain `model.generate` at batch 1 (greedy, the same prompt length and new tokens),
2. the SliceMoE adapter (MAT84 AMAT experts, DBSC, 25% cache, per-row caches and hardware
   accounting in the loop) at batch 1 and batch 64: simulated devices x decode tokens / s.

    python benchmarks/adapter_decode.py                       # GPU, full shape
    python benchmarks/adapter_decode.py --small --device cpu  # a smaller model on CPU
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch

from slicemoe.config import (
    BitsConfig,
    CacheConfig,
    EvalConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
)
from slicemoe.metrics import COL
from slicemoe.models import Shape
from slicemoe.models.adapter import quantize_model
from slicemoe.run import Loaded, _Simulator, load_key


def qwen15_moe_config(small: bool):
    from transformers import Qwen2MoeConfig

    if small:
        return Qwen2MoeConfig(
            vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, intermediate_size=512, moe_intermediate_size=128,
            shared_expert_intermediate_size=512, num_experts=16, num_experts_per_tok=4,
        )  # fmt: skip
    # Qwen1.5-MoE-A2.7B's published config.
    return Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
        max_position_embeddings=8192, rope_theta=1000000.0,
    )  # fmt: skip


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--batches", default="1,64")
    args = ap.parse_args()
    from transformers import Qwen2MoeForCausalLM

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg_hf = qwen15_moe_config(args.small)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = Qwen2MoeForCausalLM(cfg_hf).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = 0
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e9:.2f}B params, {dtype}, {device}")
    prompt = torch.randint(1, cfg_hf.vocab_size, (1, args.prompt), device=device)

    rows = []
    for impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
            sync(device)
            t0 = time.perf_counter()
            model.generate(
                prompt, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False
            )
            sync(device)
        dt = time.perf_counter() - t0
        rows.append((f"HF generate B=1 ({impl})", args.new / dt))
        print(rows[-1])

    cfg = RunConfig(
        model=ModelConfig(path="random", dtype=str(dtype).split(".")[-1], device=args.device),
        bits=BitsConfig(),
        cache=CacheConfig(frac=0.25),
        policy=PolicyConfig(name="dbsc", precision="dbsc", tau=0.5),
        eval=EvalConfig(max_new_tokens=args.new),
    )
    t0 = time.perf_counter()
    quantize_model(model, cfg.bits)
    sync(device)
    print(f"quantize (MAT84 AMAT, high + low path): {time.perf_counter() - t0:.1f} s")
    shape = Shape(
        cfg_hf.num_hidden_layers, cfg_hf.num_experts, cfg_hf.num_experts_per_tok,
        cfg_hf.hidden_size, cfg_hf.moe_intermediate_size,
    )  # fmt: skip
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    loaded = Loaded(load_key(cfg), model, tok, shape, device)
    for impl in ("eager", "grouped_mm"):
        model.set_experts_implementation(impl)
        for b in [int(x) for x in args.batches.split(",")]:
            sim = _Simulator(cfg, loaded)
            prompts = torch.randint(1, cfg_hf.vocab_size, (b, args.prompt)).tolist()
            sim.batch(0, prompts[:1], max_new=4)  # warm-up
            sim = _Simulator(cfg, loaded)
            sync(device)
            t0 = time.perf_counter()
            sim.batch(0, prompts, max_new=args.new)
            sync(device)
            dt = time.perf_counter() - t0
            steps = int(sim.rows()[:, COL["tokens"]].sum())
            rows.append((f"SliceMoE adapter B={b} ({impl}), prefill+decode", steps / dt))
            print(rows[-1], f"{steps} decode tokens in {dt:.1f} s")
    print("\n| path | decode tokens/s |\n|---|---|")
    for name, tps in rows:
        print(f"| {name} | {tps:.1f} |")


if __name__ == "__main__":
    main()
