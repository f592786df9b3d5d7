"""One run end to end: a model, a cache, a precision policy and a task -> a flat metrics dict.

`run(cfg)` is a pure function of the resolved config (and its seed). `load(cfg)` does the heavy
part (reading and quantizing the model) so that a process serving many runs of one model (a
sweep worker) loads it once per `load_key`.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slicemoe.batching import (
    CPU_BATCH,
    auto_batches,
    batch_sizes,
    longest_first,
    row_bytes,
    sizes,
)
from slicemoe.config import PACKED_ALIKE, PrefetchConfig, RunConfig
from slicemoe.metrics import METRICS, assemble
from slicemoe.models import Shape, checkpoint_dir, moe_blocks, read_shape, skeleton
from slicemoe.models.adapter import quantize_model
from slicemoe.optimality import optimality
from slicemoe.quant import reference_bytes
from slicemoe.replay import miss_ratio_curve, replay
from slicemoe.simulator import Clock, Simulator
from slicemoe.stream import Stream, cache_independent, not_replayable, replayable, stream_key
from slicemoe.trace import write_trace
from slicemoe.traces import import_trace
from slicemoe.validate import ConfigError, capacity_bytes, get_task_or_error, validate

# The runner API of the sweep (sweep.jobs.RUNNER_API), and what tests and notebooks import.
__all__ = [
    "METRICS",
    "ConfigError",
    "capacity_bytes",
    "load",
    "load_key",
    "miss_ratio_curve",
    "optimality",
    "record",
    "record_packed",
    "replay",
    "replayable",
    "run",
    "stream_key",
    "validate",
]


# --- loading ---------------------------------------------------------------------------------


@dataclass
class Loaded:
    key: str
    model: object
    tokenizer: object
    shape: Shape
    device: torch.device
    clock: Clock | None = None  # set by a benchmark to time the model pass's phases


def load_key(cfg: RunConfig) -> str:
    """Configs with one key share a loaded model (the backend runs on any)."""
    if cfg.stream_file is not None:  # nothing to load (see `load`)
        return json.dumps({"stream_file": cfg.stream_file})
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k != "backend"}
    return json.dumps([model, dataclasses.asdict(cfg.bits)], sort_keys=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load(cfg: RunConfig, ahead: bool = True) -> Loaded | None:
    """The model, quantized; None for a config that replays a trace (cfg.stream_file). On CUDA
    the pass's kernels compile meanwhile (`compile_ahead`), unless `ahead` is False."""
    if cfg.stream_file is not None:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoint_dir(cfg.model.name, cfg.model.path)
    device = _device(cfg.model.device)
    tok = AutoTokenizer.from_pretrained(path)
    thread = compile_ahead(cfg, path, tok, device) if ahead and device.type == "cuda" else None
    # Never a pickle checkpoint (validate refuses them too). No hub kernels: they come from the
    # network and would replace the layers that slicemoe.models.adapter instruments.
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, cfg.model.dtype), use_safetensors=True, use_kernels=False
    )
    model = _adapted(model.to(device).eval(), cfg, device)
    if thread is not None:
        thread.join()
    return Loaded(load_key(cfg), model, tok, read_shape(path), device)


def _adapted(model, cfg: RunConfig, device: torch.device):
    """`model` with its norms and rotary embedding one kernel each (CUDA) and its experts
    quantized: on CUDA held once, as codes (slicemoe.models.code_experts). No parameter asks
    for gradients: a forward pass outside `torch.no_grad` (a benchmark's, a notebook's) would
    otherwise keep every activation for a backward pass that never comes."""
    model.requires_grad_(False)
    if device.type == "cuda":
        from slicemoe import kernels

        kernels.fuse(model)
    quantize_model(model, cfg.bits, codes=device.type == "cuda")
    return model


def compile_ahead(cfg: RunConfig, path: str, tok, device: torch.device):
    """A started thread that runs `cfg`'s model pass, recording, on a copy of the model cut to
    its first two MoE layers (`_cut`), random weights (built here, the global RNGs left as they
    were): short batches of each size at which the experts' kernels differ
    (`expert_gemm.launch_tokens`), so that Triton compiles the kernels the pass launches (all
    but the cache's layer step, built for the copy's slot count) while the checkpoint loads,
    where a machine's first pass would compile them in its first batches (7.5-11 s of a GSM8K
    pass on an H100; the load slows by about as much, docs/simulator.md). None where no cut
    model has a MoE block, or where the model and the copy together would not fit the GPU's
    free memory (the copy must not crowd the checkpoint out). The thread tells stderr if it
    fails: the pass then compiles what is left, as it would have."""
    from transformers import AutoModelForCausalLM

    from slicemoe.kernels.expert_gemm import launch_tokens

    full = skeleton(path)
    cut = _cut(full.config, min(2, len(moe_blocks(full))))
    if cut is None:
        return None
    weights = sum(p.numel() for p in [*full.parameters(), *cut.parameters()])
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if weights * getattr(torch, cfg.model.dtype).itemsize > free:
            return None
    config = cut.config
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, cfg.model.dtype))
    model = _adapted(model.eval(), cfg, device)
    shape = dataclasses.replace(read_shape(path), num_moe_layers=len(moe_blocks(model)))
    loaded = Loaded(load_key(cfg), model, tok, shape, device)
    *decode, grouped = launch_tokens(shape.num_experts, shape.top_k, cfg.bits.group)
    # (rows, prompt tokens): a decode step at each size, and a prefill that takes the grouped
    # GEMM in one piece of 16-token prompts.
    batches = [(rows, 2) for rows in decode] + [(-(-grouped // 16), 16)]
    vocab = config.get_text_config().vocab_size

    def compile_all():
        try:
            with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                sim = Simulator(cfg, loaded, record=True, capture=False)
                for rows, tokens in batches:
                    prompt = [i % vocab for i in range(tokens)]
                    sim.generate_until(np.arange(rows), [prompt] * rows, max_new=2)
        except Exception as err:  # the pass compiles what is left
            print(f"slicemoe: kernels not compiled ahead ({type(err).__name__}: {err}); the "
                  "first batches compile them", file=sys.stderr)  # fmt: skip

    thread = threading.Thread(target=compile_all, name="slicemoe-compile-ahead", daemon=True)
    thread.start()
    return thread


def _cut(config, moe_layers: int):
    """The model of `config` with the fewest decoder layers (up to 4) that hold `moe_layers` MoE
    blocks, or as many as those 4 hold, on the meta device (shapes, no weights); None if none.
    Two, where the model has them: a recording pass ranks each next MoE layer's experts (a
    top-k of another depth), which a lone MoE layer never does."""
    from transformers import AutoModelForCausalLM

    best, most = None, 0
    for layers in range(1, min(4, config.get_text_config().num_hidden_layers) + 1):
        cut = copy.deepcopy(config)
        cut.get_text_config().num_hidden_layers = layers
        try:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cut)
        except Exception:  # a config whose layers cannot be cut
            break
        found = len(moe_blocks(model))
        if found > most:
            best, most = model, found
        if found >= moe_layers:
            break
    return best


# --- evaluation ------------------------------------------------------------------------------


def batch_plan(cfg: RunConfig, loaded: Loaded, lens, rest: int, groups: int) -> np.ndarray:
    """The sequences a batch takes when it starts at each of the run's sequences, in the order
    they run (`lens`: their prompt tokens, longest first; `rest`: the tokens decoded after the
    prompt; `groups`: packed configs, a row each per sequence): cfg.batch_size's rows, or for
    `auto` batches that fit the GPU's free memory (slicemoe.batching.auto_batches, said on
    stderr with why), CPU_BATCH rows off CUDA."""
    n = len(lens)
    if cfg.batch_size != "auto" or loaded.device.type != "cuda":
        rows = CPU_BATCH if cfg.batch_size == "auto" else cfg.batch_size
        return np.full(n, max(1, rows // groups))
    dev = loaded.device
    free, total = torch.cuda.mem_get_info(dev)
    reserved = torch.cuda.memory_reserved(dev)
    # A process capped with torch.cuda.set_per_process_memory_fraction may reserve no more.
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)
    free = min(free, int(fraction * total) - reserved)
    # Blocks PyTorch's allocator holds but no tensor uses are free to this process too.
    free += reserved - torch.cuda.memory_allocated(dev)
    dims = sizes(loaded.model.config, loaded.shape, getattr(torch, cfg.model.dtype).itemsize)
    plan = auto_batches(free, dims, lens, rest, groups)
    runs = batch_sizes(plan)
    longest = int(lens[0]) if n else 1
    row = row_bytes(dims, longest + rest, rest)
    print(
        f"batch_size=auto: {len(runs)} batches of {min(runs, default=0)} to "
        f"{max(runs, default=0)} sequences, longest prompts first ({free / 2**30:.1f} GiB free "
        f"on {dev}; {row / 2**20:.1f} MiB a row for the longest, {longest} prompt + {rest} new "
        "tokens)",
        file=sys.stderr,
    )
    return plan


def _in_batches(plan: np.ndarray, run_batch) -> int:
    """run_batch(start, stop) over items 0..len(plan), a batch starting at item i taking plan[i]
    of them; returns the most a batch took. A batch that runs out of GPU memory is retried
    halved (the simulator keeps nothing of a batch that did not end), and no later batch takes
    more."""
    n, start, most, cap = len(plan), 0, 0, None
    while start < n:
        stop = min(start + int(plan[start] if cap is None else min(plan[start], cap)), n)
        try:
            run_batch(start, stop)
        except torch.OutOfMemoryError as err:
            if stop - start == 1:
                raise torch.OutOfMemoryError(
                    "one sequence does not fit in GPU memory (batch 1); lower "
                    f"eval.max_new_tokens or use a larger GPU: {str(err).splitlines()[0]}"
                ) from None
            failed, cap, why = stop - start, (stop - start) // 2, str(err).splitlines()[0]
        else:
            start, most = stop, max(most, stop - start)
            continue
        # Out of the except block, the error's frames (and the batch's KV cache) are gone.
        gc.collect()  # the failed batch's captured CUDA graph refers to the batch: a cycle
        torch.cuda.empty_cache()
        print(f"batch of {failed} ran out of GPU memory ({why}); retrying as {cap}",
              file=sys.stderr)  # fmt: skip
    return most


def _evaluate(cfgs: list[RunConfig], loaded: Loaded, record: bool = False, progress=None,
              streams_only: bool = False):  # fmt: skip
    """The model pass of configs that share `loaded`, the task and the batch (several: packed,
    side by side in every batch): (the simulator with each config's Group of meters, per config
    the task scores, prompt tokens, the most sequences a batch took). The scores are
    per problem, in problem order, for generation tasks; perplexity is one value.
    `progress(done, total, tokens)`: see `run`, over the sequences of every config;
    `streams_only`: the pass is for the request streams alone (simulator.Simulator).

    Sequences run longest prompt first: a batch's KV cache and prefill are as long as its
    longest prompt, so batches of like lengths pad little (GSM8K 5-shot in batches of 147: 29 %
    fewer prompt positions and 24 % fewer KV slots than in problem order), and the first batch
    is the largest (were it not to fit, that shows at once). A sequence's results do not depend
    on its batch (simulator.Simulator)."""
    cfg = cfgs[0]
    task = get_task_or_error(cfg.eval.task)
    tok = loaded.tokenizer
    if task.kind == "generate":
        docs = task.docs(cfg.eval, tok)
        # One call for all: a fast tokenizer encodes a list on all cores.
        prompts = tok([d.prompt for d in docs])["input_ids"] if docs else []
    else:
        windows = task.windows(cfg.eval, tok)
        prompts = [w.input_ids[: max(w.n_context, 1)] for w in windows]
        forced = [w.input_ids[max(w.n_context, 1) :] for w in windows]
    order = longest_first(prompts)
    groups = len(cfgs)
    tell = None
    if progress is not None:
        progress(0, len(prompts) * groups, 0)

        def tell(done, tokens):
            progress(done, len(prompts) * groups, tokens)

    sim = Simulator(cfgs, loaded, record=record, progress=tell, streams_only=streams_only)
    # Per config, each sequence's result (its scores, or its forced tokens' NLLs).
    results: list[dict[int, object]] = [{} for _ in cfgs]

    def run_in_order(rest: int, run_batch) -> int:
        plan = batch_plan(cfg, loaded, [len(prompts[i]) for i in order], rest, groups)

        def ordered(start, stop):
            seqs = order[start:stop]
            out = run_batch(seqs)
            for g, group_results in enumerate(results):
                group_results.update(zip(seqs.tolist(), out[g * len(seqs) : (g + 1) * len(seqs)]))

        return _in_batches(plan, ordered)

    if task.kind == "generate":
        max_new = cfg.eval.max_new_tokens

        def generate(seqs):
            texts = sim.generate_until(
                seqs, [prompts[i] for i in seqs], task.stop, max_new, tok.eos_token_id
            )
            return [task.score(docs[i], t) for i, t in zip(np.tile(seqs, groups), texts)]

        size = run_in_order(max_new, generate)
        scores = [
            {k: [r[i][k] for i in range(len(docs))] for k in (r[0] if r else {})} for r in results
        ]
    else:

        def score(seqs):
            return sim.loglikelihood(seqs, [prompts[i] for i in seqs], [forced[i] for i in seqs])

        size = run_in_order(max(map(len, forced), default=1), score)
        scores = []
        for r in results:
            nll = [x for i in range(len(windows)) for x in r[i]]
            scores.append({"perplexity": [math.exp(float(np.mean(nll))) if nll else float("nan")]})
    return sim, scores, sum(map(len, prompts)), size


def _prepare(cfg: RunConfig, loaded: Loaded | None) -> Loaded | None:
    validate(cfg)
    if loaded is None or cfg.stream_file is not None:
        return load(cfg)
    if loaded.key != load_key(cfg):
        raise ValueError("`loaded` was made for another model/bits config; call load(cfg)")
    return loaded


def record(cfg: RunConfig, loaded: Loaded | None = None, progress=None) -> Stream:
    """One model pass of a replayable config -> its request stream (slicemoe.stream);
    `progress`: see `run`."""
    return record_packed([cfg], loaded, progress)[0]


def record_packed(cfgs: list[RunConfig], loaded: Loaded | None = None, progress=None):
    """One model pass of several replayable configs that share the fields PACKED_ALIKE, each
    config's devices a group of rows in every batch (slicemoe.simulator) -> their request
    streams, in order. Each is the stream `record` gives the config alone wherever a row's
    results do not depend on the rest of its batch (the CPU; on CUDA see docs/replay.md)."""
    if not cfgs:
        raise ValueError("record_packed: no configs")
    for cfg in cfgs[1:]:
        for name in PACKED_ALIKE:
            if getattr(cfg, name) != getattr(cfgs[0], name):
                raise ValueError(
                    f"record_packed: configs packed into one pass share {name}; "
                    f"{getattr(cfg, name)!r} differs from {getattr(cfgs[0], name)!r}"
                )
    loaded = _prepare(cfgs[0], loaded)
    for cfg in cfgs[1:]:
        validate(cfg)
    if cfgs[0].stream_file is not None:  # the trace is the pass
        return [import_trace(cfg.stream_file, cfg=cfg) for cfg in cfgs]
    ran = []
    for cfg in cfgs:
        if not replayable(cfg):
            raise ValueError(
                f"{not_replayable(cfg)}; run it with the model in the loop, slicemoe.run.run"
            )
        if cache_independent(cfg):
            # The stream does not depend on the cache or the prefetcher; any in-loop eviction
            # records it. Otherwise they shape the requests, so they run as configured.
            cfg = dataclasses.replace(
                cfg,
                cache=dataclasses.replace(cfg.cache, eviction="lru"),
                prefetch=PrefetchConfig(),
            )
        ran.append(cfg)
    torch.manual_seed(cfgs[0].seed)
    sim, scores, _, size = _evaluate(ran, loaded, True, progress, streams_only=True)
    streams = []
    for cfg, group, group_scores in zip(ran, sim.groups, scores):
        # The stream's config, for the record, is the one that ran: `auto` as the most
        # sequences a batch took.
        config = dataclasses.asdict(dataclasses.replace(cfg, batch_size=size))
        streams.append(group.recorder.stream(stream_key(cfg), config, sim.dims, group_scores))
    return streams


def run(cfg: RunConfig, loaded: Loaded | None = None, progress=None) -> dict:
    """Metrics (slicemoe.metrics.METRICS) of one run, plus "curves", "problems" (correctness
    per problem) and "trace_path". `progress(done, total, tokens)`, if given, is told as the
    model pass goes how many of its `total` sequences (documents, or perplexity windows) are
    done and how many tokens were decoded; the caller decides how to show it.

    Belady's oracle and the oracle prefetcher need the future: the model pass records the
    request stream, and the replay reads it (slicemoe.replay). A trace (cfg.stream_file) is
    replayed the same way, with no model."""
    t0 = time.time()
    loaded = _prepare(cfg, loaded)
    if cfg.cache.eviction == "belady" or cfg.prefetch.predictor == "oracle" or cfg.stream_file:
        result = replay(record(cfg, loaded, progress), cfg)
        result["wall_s"] = time.time() - t0
        return result
    torch.manual_seed(cfg.seed)
    sim, (scores,), prefill_tokens, size = _evaluate([cfg], loaded, cfg.trace, progress)
    (group,) = sim.groups
    result = assemble(
        cfg,
        group.rows(),
        group.prefill_cost,
        group.warmup_bytes,
        prefill_tokens,
        scores,
        group.capacity,
        group.fp.sizes["FULL"],
        reference_bytes(loaded.shape.expert_params),
        (group.layer_predicted, group.layer_covered),
    )
    # Not "batch_size": the config field of that name is logged beside it (MLflow params).
    result["batch_rows"] = size
    traces = [t for _, t in sorted(group.traces.items())]  # in sequence order
    result["trace_path"] = write_trace(cfg, traces) if cfg.trace else None
    if cfg.trace:  # the run's requests, compactly, next to the trace (slicemoe.stream)
        stream = group.recorder.stream(stream_key(cfg), dataclasses.asdict(cfg), sim.dims, scores)
        result["stream_path"] = str(stream.save(Path(result["trace_path"]).with_suffix(".npz")))
    result["wall_s"] = time.time() - t0
    return result
