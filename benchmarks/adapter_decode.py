"""Decode speed of the simulator against plain transformers, at Qwen1.5-MoE-A2.7B shape.

Random bf16 weights from the model's published config (no checkpoint needed), one process,
one GPU, every row measured in this run. Decode-only step times: for `generate`, (time of a
1 + N token generation - time of a 1-token one) / N; for the simulator, N decode steps after
the prefill and two warm-up steps (the first runs eagerly, the second is captured).
1. plain `generate`, dynamic KV cache, B=1;
2. plain `generate`, static KV cache (transformers compiles its decode step with CUDA graphs),
   B=1 and B=64;
3. the simulator as it was before the device runtime (reference runtime on the host, two
   dequantized copies of the experts, dynamic KV cache), B=64;
4. the simulator (device runtime, experts held once as codes, static KV cache, decode step
   captured as a CUDA graph) at B=1, 64, 256: MAT84 AMAT experts, DBSC, 25 % cache; with the
   model-only step (the same captured step with plain top-k routing and no simulated devices)
   and the share of the step spent outside it; then the largest batch that fits.
Memory is capped at `--memory-gib` (an 80 GB GPU's 79.6 GiB by default).

    python benchmarks/adapter_decode.py                       # GPU, full shape
    python benchmarks/adapter_decode.py --small --device cpu  # a small model on the CPU (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

from slicemoe.config import BitsConfig, CacheConfig, ModelConfig, PolicyConfig, RunConfig
from slicemoe.kernels import fuse
from slicemoe.models import Shape, gate_rule, moe_blocks
from slicemoe.models.adapter import install, quantize_model
from slicemoe.routing import RoutingParams, route
from slicemoe.run import Loaded, load_key
from slicemoe.runtime import Bindable
from slicemoe.simulator import Captured, Simulator, StaticKV, cache_kw


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


def gib(device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device):
    gc.collect()  # what an earlier row left unreachable does not count against this one
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def random_model(hf_config, device, dtype):
    from transformers import Qwen2MoeForCausalLM

    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = Qwen2MoeForCausalLM(hf_config).eval()
    torch.set_default_dtype(torch.float32)
    model.generation_config.pad_token_id = 0
    return model


def generate_step_s(model, batch, prompt, new, device, **kw) -> float:
    """Decode-only seconds per step of plain `generate` (greedy, exactly `new` tokens): the
    time between the first and the last step's logits (a difference of two whole `generate`
    calls, one with the prefill only, can come out negative on a busy machine)."""
    from transformers import LogitsProcessorList

    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    stamps = []

    def stamp(_, scores):
        sync(device)
        stamps.append(time.perf_counter())
        return scores

    def timed(n):
        stamps.clear()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       logits_processor=LogitsProcessorList([stamp]), **kw)  # fmt: skip
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    with torch.no_grad():
        timed(new + 1)  # warm-up (and, with a static cache, compilation)
        return timed(new + 1)


class PlainRouting(Bindable):
    """The model's own top-k routing, high path: the model alone, no simulated device."""

    def __init__(self, gate):
        self.gate = gate

    def route(self, state, layer, logits, bias=None, hidden=None):
        no_cache = torch.zeros_like(logits, dtype=torch.bool)
        idx, w = route("topk", self.gate, logits, no_cache, RoutingParams(bias=bias))
        return w.to(logits.dtype), idx


def model_only_step_s(model, batch, prompt, steps, device) -> float:
    """The captured decode step of the model alone (codes, static KV, plain routing)."""
    plain = PlainRouting(gate_rule(model.config))
    install(model, plain)
    kv = StaticKV(model, cache_kw(model), batch, prompt + steps + 2)
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    pos = torch.arange(prompt, device=device).expand(batch, -1)
    tok = torch.ones(batch, dtype=torch.long, device=device)
    nxt = torch.full((batch,), prompt, device=device)
    with torch.no_grad(), plain.bound(()):
        logits = kv.prefill(ids, torch.ones_like(ids), pos)

        def step():
            logits.copy_(kv.step(tok, nxt))
            nxt.add_(1)

        run = Captured(step) if device.type == "cuda" else step
        run()
        run()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            run()
        sync(device)
    return (time.perf_counter() - t0) / steps


def simulator_step_s(cfg, loaded, batch, prompt, steps, device, profile=False):
    """Decode-only seconds per step of the simulator, and (with `profile`) the GPU time by
    kernel of its first, eager step."""
    sim = Simulator(cfg, loaded)
    prompts = torch.randint(1, loaded.model.config.vocab_size, (batch, prompt)).tolist()
    active = np.ones(batch, dtype=bool)
    kernels = None
    with torch.no_grad():
        b = sim.prefill(range(batch), prompts, steps=np.full(batch, steps + 2))
        if profile and device.type == "cuda":
            kernels = _profile(lambda: sim.decode_step(b, active))
        else:
            sim.decode_step(b, active)
        sim.decode_step(b, active)  # on CUDA: captured, then replayed from here on
        sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            sim.decode_step(b, active)
        sync(device)
    return (time.perf_counter() - t0) / steps, sim, kernels


def _profile(fn) -> list:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = [(e.key, e.device_time_total, e.count) for e in prof.key_averages()
            if e.device_time_total > 0]  # fmt: skip
    return sorted(rows, key=lambda r: -r[1])


# Kernel names by what they do (torch's, transformers' and this project's kernels).
KINDS = (
    ("caches (layer step)", ("_layer_step",)),
    ("experts (codes)", ("_gate_up", "_down")),
    ("dense GEMMs", ("gemm", "gemv", "cutlass", "sm90_", "splitK")),
    ("attention", ("fmha", "flash", "attention", "sdpa", "efficient")),
    ("sort / scan / top-k", ("sort", "scan", "topk", "radix", "searchsorted", "cub")),
)


def kernel_kinds(kernels) -> dict:
    total = sum(t for _, t, _ in kernels) or 1.0
    out = {}
    for name, t, _ in kernels:
        kind = next((k for k, keys in KINDS if any(x in name for x in keys)), "elementwise etc.")
        out[kind] = out.get(kind, 0.0) + t / total
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed per row")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--memory-gib", type=float, default=79.6)
    ap.add_argument(
        "--rows",
        default="plain,before,simulator,largest",
        help="which rows to take (a long run can be split in two)",
    )
    ap.add_argument("--json", help="write the rows here too")
    args = ap.parse_args()
    wanted = set(args.rows.split(","))
    unknown = wanted - {"plain", "before", "simulator", "largest"}
    if unknown:
        ap.error(f"--rows: unknown {sorted(unknown)}; choose from plain,before,simulator,largest")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    hf = qwen15_moe_config(args.small)
    model = random_model(hf, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"model: {params / 1e9:.2f}B params, {dtype}, {name}", flush=True)
    rows = []

    def add(path, batch, step_s, memory=float("nan"), **extra):
        rows.append(dict(path=path, batch=batch, step_ms=1e3 * step_s,
                         tokens_per_s=batch / step_s, memory_gib=memory, **extra))  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)

    new = args.steps
    if "plain" in wanted:
        reset_peak(device)
        add("plain generate, dynamic KV", 1, generate_step_s(model, 1, args.prompt, new, device),
            gib(device))  # fmt: skip
        if cuda:  # transformers compiles the static-cache decode step on accelerators only
            for b in (1, 64):
                reset_peak(device)
                step = generate_step_s(model, b, args.prompt, new, device,
                                       cache_implementation="static")  # fmt: skip
                add("plain generate, static KV + compiled CUDA graph", b, step, gib(device))
    cfg = RunConfig(
        model=ModelConfig(path="random", dtype=str(dtype).split(".")[-1], device=args.device),
        bits=BitsConfig(),
        cache=CacheConfig(frac=0.25),
        policy=PolicyConfig(name="dbsc", precision="dbsc", tau=0.5),
    )
    shape = Shape(hf.num_hidden_layers, hf.num_experts, hf.num_experts_per_tok, hf.hidden_size,
                  hf.moe_intermediate_size)  # fmt: skip
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=None)
    batches = [int(x) for x in args.batches.split(",")]

    # Before: the reference runtime, two dequantized copies of the experts, dynamic KV.
    if "before" in wanted:
        quantize_model(model, cfg.bits)
        before = Loaded(load_key(cfg), model, tok, shape, device)
        reset_peak(device)
        b = 64 if cuda else batches[-1]
        with _guard(f"before B={b}"):
            step, _, _ = simulator_step_s(replace(cfg, model=replace(cfg.model, backend="python")),
                                          before, b, args.prompt, new, device)  # fmt: skip
            add("simulator before: host runtime, 2 expert copies, dynamic KV", b, step, gib(device))
        del before
    del model
    reset_peak(device)
    if not wanted & {"simulator", "largest"}:
        return report(rows, args)

    # Now: experts held once as codes, the device runtime, static KV, captured step.
    model = random_model(hf, device, dtype)
    if cuda:
        fuse(model)  # as slicemoe.run.load does on CUDA
    quantize_model(model, cfg.bits, codes=True)
    codes = sum(
        t.numel() * t.element_size() for b in moe_blocks(model) for t in b.experts.buffers()
    )
    matrices = hf.num_hidden_layers * hf.num_experts * 3  # gate, up, down: H x I each
    copies = 2 * matrices * hf.hidden_size * hf.moe_intermediate_size * 2  # two bf16 copies
    print(f"experts: {codes / 2**30:.2f} GiB as codes (two bf16 copies: {copies / 2**30:.2f} GiB)")
    loaded = Loaded(load_key(cfg), model, tok, shape, device)
    tensor = replace(cfg, model=replace(cfg.model, backend="tensor"))
    for b in batches if "simulator" in wanted else ():
        with _guard(f"simulator B={b}"):
            reset_peak(device)
            step, sim, kernels = simulator_step_s(tensor, loaded, b, args.prompt, new, device,
                                                  profile=True)  # fmt: skip
            memory = gib(device)
            del sim
            gc.collect()  # the batch's KV cache and captured step (a reference cycle)
            alone = model_only_step_s(model, b, args.prompt, new, device)
            extra = dict(model_only_ms=1e3 * alone, outside_model=1 - alone / step)
            if kernels:
                extra["gpu_time_by_kernel_kind"] = kernel_kinds(kernels)
                extra["eager_step_kernels"] = dict(
                    ms=sum(t for _, t, _ in kernels) / 1e3, launches=sum(c for *_, c in kernels)
                )
                extra["top_kernels"] = [(n[:60], round(t / 1e3, 3), c) for n, t, c in kernels[:12]]
            add("simulator: device runtime, codes, static KV, CUDA graph", b, step, memory, **extra)
    if cuda and "largest" in wanted:
        largest = None
        for b in (384, 512, 640, 768, 1024):
            try:
                reset_peak(device)
                step, sim, _ = simulator_step_s(tensor, loaded, b, args.prompt, 4, device)
                del sim
                largest = (b, step, gib(device))
            except torch.OutOfMemoryError as err:
                print(f"B={b} does not fit: {str(err)[:120]}", flush=True)
                break
            finally:
                gc.collect()
        if largest:
            add(f"simulator, largest batch tried that fits in {args.memory_gib} GiB", *largest)
    report(rows, args)


def report(rows, args):
    print("\n| path | B | decode step ms | device-tokens/s | peak GiB | model-only ms | "
          "share outside the model |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        alone = f"{r['model_only_ms']:.2f}" if "model_only_ms" in r else "-"
        share = f"{100 * r['outside_model']:.0f} %" if "outside_model" in r else "-"
        print(f"| {r['path']} | {r['batch']} | {r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['memory_gib']:.1f} | {alone} | {share} |")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


@contextlib.contextmanager
def _guard(what: str):
    """A row that fails says so and the others still run."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - a benchmark reports, it does not stop
        print(f"{what}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
