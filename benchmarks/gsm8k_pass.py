"""The full GSM8K record pass at a real model's shape: where its time and memory go.

A stand-in checkpoint is built first: random weights from a shipped config.json (default
Qwen1.5-MoE-A2.7B; `from_config` + `save_pretrained`, no hub) and a byte-level BPE tokenizer
trained on GSM8K's train split, so prompts have realistic lengths (random weights: accuracy and
routing mean nothing here; times and memory do). Then `slicemoe.run.load` and
`slicemoe.run.record` of a replayable config (5-shot, 256 new tokens, batch_size=auto), timed
by phase (slicemoe.simulator.Clock), with the pass's roofline.

    python benchmarks/gsm8k_pass.py                           # GPU, full shape, all 1,319
    python benchmarks/gsm8k_pass.py --small --device cpu      # a small model on the CPU (CI)
    python benchmarks/gsm8k_pass.py --step 128 --step-from 60 # one batch's recorded step
    python benchmarks/gsm8k_pass.py --step 128 --step-from 60 --profile  # and its kernels
    python benchmarks/gsm8k_pass.py --step 128 --step-from 60 --profile --trace step.json
    python benchmarks/gsm8k_pass.py --step 128 --step-from 60 --one-stream  # as on one stream

`--step ROWS`: instead of the pass, the recorded decode step of one batch of ROWS prompts (those
at length ranks --step-from onwards, longest first, as the pass orders them), captured as a CUDA
graph as the pass runs it (eager off CUDA), timed over STEP_TIMED steps after STEP_WARM.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from slicemoe import tensor_runtime
from slicemoe.batching import longest_first, sizes
from slicemoe.config import EvalConfig, ModelConfig, PolicyConfig, RunConfig
from slicemoe.models import adapter, model_dims
from slicemoe.run import load, record
from slicemoe.simulator import Clock, Simulator
from slicemoe.validate import get_task_or_error

ROOT = Path(__file__).resolve().parent.parent
QWEN = ROOT / "slicemoe/checkpoints/configs/qwen1.5-moe-a2.7b/config.json"
DATA = ROOT.parent / "shared/data/gsm8k"
H100_BYTES_PER_S = 3.35e12  # HBM3 bandwidth
H100_FLOPS = 990e12  # bf16 dense tensor cores
EOS = "<|endoftext|>"
STEP_WARM, STEP_TIMED = 3, 32  # the first step runs eagerly, the second is captured
STEP_ROOM = 47  # --step's KV slots past the prompts (the seventh round's table had 47)
STEP_PROFILED = 4  # --profile: steps under torch.profiler, after the timed ones
PROFILE_LINES = 25  # --profile: the kernels printed (--json keeps them all)
# --small: the shipped config shrunk to run in seconds on one CPU core.
SMALL = dict(
    hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    shared_expert_intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
)  # fmt: skip


def train_tokenizer(data: Path, vocab: int, folder: Path, rows: int | None = None):
    """A byte-level BPE tokenizer trained on the train split's questions and answers (its
    first `rows`; None: all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (data / "train.jsonl").read_text().splitlines()[:rows]
    rows = [json.loads(line) for line in lines]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    bpe.train_from_iterator((r["question"] + "\n" + r["answer"] for r in rows), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)
    tok.save_pretrained(folder)
    return tok


def build_checkpoint(config_file: Path, data: Path, folder: Path, small: bool, device, dtype):
    """Random weights of `config_file`'s shape (shrunk with `small`) and a GSM8K tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = (train_tokenizer(data, 2048, folder, 1000) if small
           else train_tokenizer(data, 32000, folder))  # fmt: skip
    fields = json.loads(config_file.read_text()) | (SMALL if small else {})
    eos = tok.convert_tokens_to_ids(EOS)
    fields |= dict(vocab_size=len(tok), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    config = AutoConfig.for_model(**fields)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the pass's batch_size=auto sees the memory free again


@contextmanager
def kernel_builds():
    """Within: the Triton kernels built (compiled, or read from Triton's on-disk cache) and
    the seconds that took, as (Counter of kernel names, a list of each build's name and
    specialisation key, [seconds])."""
    from triton import knobs

    names, signatures, seconds, began = Counter(), [], [0.0], {}

    def before(*, key, **_):
        began[str(key)] = time.perf_counter()
        return False  # build it

    def after(*, key, fn, **_):
        seconds[0] += time.perf_counter() - began.pop(str(key), time.perf_counter())
        names[fn.name] += 1
        signatures.append(f"{fn.name} {key}")

    hooks = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    try:
        yield names, signatures, seconds
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = hooks


def roofline(loaded, cfg: RunConfig, stream, steps: int) -> dict:
    """Of the whole pass: the decode's bytes (every weight, the experts as held, once per decode
    step; each row's KV cache at its context, once per step it ran) at the H100's bandwidth, and
    the prefill's FLOPs (matmuls of the active weights and attention over each prompt) at its
    bf16 peak."""
    model, shape = loaded.model, loaded.shape
    weights = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    dtype_bytes = getattr(torch, cfg.model.dtype).itemsize
    s = sizes(model.config, shape, dtype_bytes)
    lens, ran = stream.prompt_len.astype(float), stream.decode_steps.astype(float)
    kv = s.layers * s.kv_per_token * dtype_bytes * float((ran * lens + ran * (ran - 1) / 2).sum())
    dims, m = model_dims(model), shape.num_moe_layers
    active = m * (dims.dense_params + shape.top_k * shape.expert_params)
    flops = 2 * active * lens.sum() + 2 * dims.attn_dim * m * (lens**2).sum()
    decode_bytes = steps * weights + kv
    return {
        "weights_bytes": weights,
        "kv_bytes": kv,
        "decode_bytes": decode_bytes,
        "decode_roofline_s": decode_bytes / H100_BYTES_PER_S,
        "prefill_flops": flops,
        "prefill_roofline_s": flops / H100_FLOPS,
    }


def step_time(
    cfg: RunConfig, loaded, rows: int, first: int, profile: bool = False, trace: Path | None = None
) -> dict:
    """The pass's recorded decode step at `rows` rows: the prompts at length ranks first ..
    first + rows - 1 (longest first), prefilled with STEP_ROOM steps planned; `profile`: its
    kernels too (`profiled`, which writes them to `trace` as a Chrome trace)."""
    tok = loaded.tokenizer
    docs = get_task_or_error(cfg.eval.task).docs(cfg.eval, tok)
    prompts = tok([d.prompt for d in docs])["input_ids"]
    seqs = longest_first(prompts)[first : first + rows]
    if len(seqs) < rows:
        raise SystemExit(f"--step {rows} --step-from {first}: only {len(prompts)} problems")
    sim = Simulator(cfg, loaded, record=True, streams_only=True)
    batch = sim.prefill(seqs, [prompts[i] for i in seqs], steps=np.full(rows, STEP_ROOM))
    active = np.ones(rows, dtype=bool)
    cuda = loaded.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    for _ in range(STEP_WARM):
        sim.decode_step(batch, active)
    sync()
    t = time.perf_counter()
    for _ in range(STEP_TIMED):
        sim.decode_step(batch, active)
    sync()
    ms = 1e3 * (time.perf_counter() - t) / STEP_TIMED
    kernels = profiled(lambda: sim.decode_step(batch, active), cuda, trace) if profile else []
    return {
        "device": torch.cuda.get_device_name(loaded.device) if cuda else "cpu",
        "step_rows": rows,
        "step_from": first,
        "step_slots": max(len(prompts[i]) for i in seqs) + STEP_ROOM,
        "step_captured": sim.graphs,
        "step_ms": ms,
        "step_kernels": kernels,
    }


def profiled(step, cuda: bool, trace: Path | None = None) -> list[dict]:
    """STEP_PROFILED more steps under torch.profiler: per kernel name (on the CPU: per op), its
    milliseconds and launches a step, the longest first. Kernels replayed from a CUDA graph
    are listed one by one. `trace`: the steps as a Chrome trace there (each kernel on its
    stream, in order: where a step waits, chrome://tracing or ui.perfetto.dev shows it)."""
    from torch.profiler import ProfilerActivity, profile

    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(STEP_PROFILED):
            step()
        if cuda:
            torch.cuda.synchronize()
    if trace is not None:
        prof.export_chrome_trace(str(trace))
    total, calls = Counter(), Counter()
    for ev in prof.events():
        if ev.device_type == kind:
            total[ev.name] += ev.device_time_total if cuda else ev.self_cpu_time_total
            calls[ev.name] += 1
    return [
        {"name": name, "ms": us / 1e3 / STEP_PROFILED, "launches": calls[name] / STEP_PROFILED}
        for name, us in total.most_common()
    ]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, default=QWEN, help="a shipped config.json")
    p.add_argument("--data", type=Path, default=DATA, help="GSM8K dir with train/test.jsonl")
    p.add_argument("--checkpoint", type=Path,
                   help="where to build it (default: a temp dir); one already there is reused")  # fmt: skip
    p.add_argument("--small", action="store_true", help="a small model, a few problems")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--limit", type=int, help="problems (default: all; --small: 4)")
    p.add_argument("--max-new", type=int, help="new tokens (default 256; --small: 8)")
    p.add_argument("--policy", default="lru_highbit", help="a conf/policy preset (replayable)")
    p.add_argument("--batch-size", default="auto", help="an integer or auto")
    p.add_argument("--json", type=Path, help="write the row as JSON here")
    p.add_argument("--step", type=int, metavar="ROWS",
                   help="time one batch's recorded decode step instead of the pass")  # fmt: skip
    p.add_argument("--step-from", type=int, default=0, metavar="RANK",
                   help="--step's first prompt, by length rank (0: the longest)")  # fmt: skip
    p.add_argument("--profile", action="store_true",
                   help="with --step: its kernels by name, time and launches a step")  # fmt: skip
    p.add_argument("--trace", type=Path, metavar="FILE",
                   help="with --profile: the profiled steps as a Chrome trace (JSON) here")  # fmt: skip
    p.add_argument("--one-stream", action="store_true",
                   help="CUDA: the routing and the recording on the model's stream, as before "
                        "they ran beside it (to compare)")  # fmt: skip
    p.add_argument("--no-compile-ahead", action="store_true",
                   help="load without compiling the kernels meanwhile (they compile in the pass)")  # fmt: skip
    p.add_argument("--memory-gib", type=float,
                   help="cap this process's GPU memory (e.g. 79.6: an 80 GB card's share)")  # fmt: skip
    a = p.parse_args(argv)
    if a.step is not None and (a.step < 1 or a.step_from < 0):
        p.error(
            f"--step {a.step} --step-from {a.step_from}: ROWS must be 1 or more, RANK 0 or more"
        )
    if a.trace is not None and (a.step is None or not a.profile):
        p.error(f"--trace {a.trace}: it writes the profiled steps; add --step ROWS --profile")
    if a.trace is not None and not a.trace.parent.is_dir():
        p.error(f"--trace {a.trace}: no folder {a.trace.parent}; make it first")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    )
    dtype = "bfloat16" if device.type == "cuda" else "float32"
    if a.one_stream:
        adapter.BESIDE = tensor_runtime.RECORD_ASIDE = False
    if a.memory_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, a.memory_gib * 2**30 / total))
    limit = a.limit if a.limit is not None else (4 if a.small else None)
    max_new = a.max_new or (8 if a.small else 256)
    batch_size = a.batch_size if a.batch_size == "auto" else int(a.batch_size)
    policy = PolicyConfig(
        **OmegaConf.to_container(OmegaConf.load(ROOT / f"conf/policy/{a.policy}.yaml"))
    )

    with tempfile.TemporaryDirectory(prefix="gsm8k-pass-") as tmp:
        folder = a.checkpoint or Path(tmp)
        t = time.perf_counter()
        if not (folder / "config.json").exists():
            build_checkpoint(a.config, a.data, folder, a.small, device, getattr(torch, dtype))
        build_s = time.perf_counter() - t
        cfg = RunConfig(
            model=ModelConfig(name=a.config.parent.name, path=str(folder), dtype=dtype,
                              device=str(device)),
            policy=policy,
            eval=EvalConfig(task="gsm8k", data_path=str(a.data), limit=limit, num_fewshot=5,
                            max_new_tokens=max_new),
            batch_size=batch_size,
        )  # fmt: skip
        t = time.perf_counter()
        loaded = load(cfg, ahead=not a.no_compile_ahead)
        load_s = time.perf_counter() - t
        if a.step is not None:
            row = step_time(cfg, loaded, a.step, a.step_from, a.profile, a.trace)
            print(f"recorded decode step on {row['device']}: {a.step} rows (length ranks "
                  f"{a.step_from}-{a.step_from + a.step - 1}), {row['step_slots']} KV slots, "
                  f"{'captured' if row['step_captured'] else 'eager'}: {row['step_ms']:.2f} ms "
                  f"a step over {STEP_TIMED} steps")  # fmt: skip
            if row["step_kernels"]:
                ks = row["step_kernels"]
                print(f"{'kernels' if device.type == 'cuda' else 'ops'} a step, over "
                      f"{STEP_PROFILED} steps: {sum(k['ms'] for k in ks):.2f} ms in "
                      f"{sum(k['launches'] for k in ks):.0f} launches")  # fmt: skip
                for k in ks[:PROFILE_LINES]:
                    print(f"  {k['ms']:8.3f} ms {k['launches']:6.0f}x  {k['name'][:100]}")
            if a.json:
                a.json.write_text(json.dumps(row, indent=1))
            return row
        loaded.clock = clock = Clock()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        builds = kernel_builds() if device.type == "cuda" else nullcontext((Counter(), [], [0.0]))
        t = time.perf_counter()
        with builds as (built, signatures, compile_s):
            stream = record(cfg, loaded)
        pass_s = time.perf_counter() - t

    sec = clock.seconds
    batch = stream.config["batch_size"]
    prefill_tokens = int(stream.prompt_len.sum())
    row = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": a.config.parent.name + (" (small)" if a.small else ""),
        "problems": int(stream.num_sequences),
        "max_new_tokens": max_new,
        "batch_size": batch,  # the most sequences a batch took
        "batches": clock.calls["prefill"],
        "memory_cap_gib": a.memory_gib,
        "build_s": build_s,
        "load_s": load_s,
        "prefill_s": sec["prefill"],
        "prefill_tokens": prefill_tokens,
        "prefill_tokens_per_s": prefill_tokens / sec["prefill"],
        "decode_s": sec["decode"],
        "decode_steps": clock.calls["decode"],
        "decode_ms_per_step": 1e3 * sec["decode"] / max(clock.calls["decode"], 1),
        "end_s": sec["end"],
        "host_s": pass_s - sum(sec.values()),
        "pass_s": pass_s,
        "total_s": load_s + pass_s,
        "compile_ahead": device.type == "cuda" and not a.no_compile_ahead,
        "kernels_built_in_pass": dict(built),
        "kernel_build_s": compile_s[0],
        "kernel_signatures_built_in_pass": signatures,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else float("nan"),
        **roofline(loaded, cfg, stream, clock.calls["decode"]),
    }
    print_table(row)
    if a.json:
        a.json.write_text(json.dumps(row, indent=1))
    return row


def print_table(r: dict) -> None:
    print(f"GSM8K record pass: {r['model']} on {r['device']}, {r['problems']} problems, "
          f"{r['max_new_tokens']} new tokens, {r['batches']} batches of at most "
          f"{r['batch_size']}"
          + (f", memory capped at {r['memory_cap_gib']} GiB" if r["memory_cap_gib"] else ""))  # fmt: skip
    built = r["kernels_built_in_pass"]
    lines = [
        ("checkpoint built", f"{r['build_s']:.1f} s"),
        ("load", f"{r['load_s']:.1f} s"),
        ("prefill", f"{r['prefill_s']:.1f} s ({r['prefill_tokens_per_s']:,.0f} tokens/s)"),
        ("decode", f"{r['decode_s']:.1f} s ({r['decode_ms_per_step']:.2f} ms/step, "
                   f"{r['decode_steps']} steps)"),  # fmt: skip
        ("end of batch", f"{r['end_s']:.1f} s"),
        ("host", f"{r['host_s']:.1f} s"),
        ("total (load + pass)", f"{r['total_s']:.1f} s"),
        ("kernels built in the pass", f"{sum(built.values())} in {r['kernel_build_s']:.1f} s"
         f" ({', '.join(f'{k} {v}' for k, v in sorted(built.items())) or 'none'}); compiled"
         f" while loading: {'yes' if r['compile_ahead'] else 'no'}"),
        ("peak GPU memory", f"{r['peak_gib']:.1f} GiB"),
        ("roofline decode", f"{r['decode_roofline_s']:.1f} s: {r['decode_steps']} steps x "
         f"weights {r['weights_bytes'] / 1e9:.2f} GB + KV {r['kv_bytes'] / 1e12:.2f} TB, "
         "at 3.35 TB/s"),
        ("roofline prefill", f"{r['prefill_roofline_s']:.2f} s: "
         f"{r['prefill_flops'] / 1e12:.1f} TFLOP at 990 TFLOP/s"),
    ]  # fmt: skip
    print("| phase | |\n|---|---|")
    for name, value in lines:
        print(f"| {name} | {value} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
