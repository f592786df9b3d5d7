"""The device runtime (model.backend=tensor) against the reference (python) on the CPU: whole
runs on the tiny model give the same metrics and curves, recorded request streams are the same,
and the static KV cache (the CUDA-graph path, run eagerly here) scores like the dynamic one."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from slicemoe.cache import SliceCache
from slicemoe.config import (
    BitsConfig,
    CacheConfig,
    EvalConfig,
    HardwareConfig,
    ModelConfig,
    PolicyConfig,
    PrefetchConfig,
    RunConfig,
)
from slicemoe.device import footprint
from slicemoe.metrics import COL, COUNTERS
from slicemoe.models import Dims, Shape
from slicemoe.routing import Gate
from slicemoe.run import load, record, run
from slicemoe.runtime import Runtime
from slicemoe.simulator import Simulator
from slicemoe.tensor_runtime import TensorRuntime

EVAL = EvalConfig(limit=3, max_new_tokens=24)
CONFIGS = {
    "dbsc": RunConfig(eval=EVAL),
    "cache_prior running pcw": RunConfig(
        policy=PolicyConfig(
            routing="cache_prior", precision="high", lam=0.2, lam_scale="running", warmup="pcw"
        ),
        eval=EVAL,
    ),
    "controller skip prev_token lfu": RunConfig(
        policy=PolicyConfig(
            routing="cache_prior", lam=0.1, miss_rate_target=0.05, on_miss="skip_lsb", tau=0.3
        ),
        prefetch=PrefetchConfig(predictor="prev_token", slices="critical"),
        cache=CacheConfig(frac=0.15, eviction="lfu"),
        eval=EVAL,
    ),
    "next_gate fifo cold max_rank mat42 drop": RunConfig(
        bits=BitsConfig(high=4, low=2),
        policy=PolicyConfig(routing="max_rank", warmup="random", on_miss="drop", drop_below=0.2),
        prefetch=PrefetchConfig(predictor="next_gate", top_m=6, slices="critical", insert="lru"),
        cache=CacheConfig(frac=0.2, eviction="fifo"),
        eval=EVAL,
    ),
    "base cumsum laptop overlap substitute": RunConfig(
        bits=BitsConfig(scheme="base"),
        policy=PolicyConfig(
            routing="cumsum", cumsum_p=0.6, warmup="last_layer", tau=0.2, on_miss="substitute"
        ),
        hardware=HardwareConfig(name="laptop", dram_gbps=1092.0, overlap_flash=True),
        eval=EVAL,
    ),
    "fp16 unsliced": RunConfig(
        bits=BitsConfig(high=None, low=None),
        policy=PolicyConfig(precision="high", warmup="empty"),
        cache=CacheConfig(frac=0.5),
        eval=EVAL,
    ),
}


def on(cfg, backend):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backend=backend))


def same(a, b, name):
    if isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), name
    elif a == int(a) and abs(a) < 2**52:  # counters, bytes, tokens: exactly
        assert a == b, name
    else:
        assert b == pytest.approx(a, rel=1e-9), name


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_whole_runs_give_the_reference_metrics_through_the_device_runtime(name):
    cfg = CONFIGS[name]
    loaded = load(cfg)
    want = run(on(cfg, "python"), loaded)
    got = run(on(cfg, "tensor"), loaded)
    assert want["decode_tokens"] > 40 and want["miss_rate"] > 0
    assert (want["dropped_fraction"] > 0) == (cfg.policy.on_miss == "drop")
    for key in want:
        if key in ("wall_s", "trace_path", "curves", "problems"):
            continue
        same(want[key], got[key], key)
    assert want["problems"] == got["problems"]
    assert want["curves"].keys() == got["curves"].keys()
    for key, curve in want["curves"].items():
        assert len(curve) == len(got["curves"][key])
        for i, (a, b) in enumerate(zip(curve, got["curves"][key])):
            same(a, b, f"{key}[{i}]")


def test_a_recorded_stream_is_the_same_through_either_runtime():
    """The device runtime records a cache-independent config's stream routing only (no cache,
    bill or counters): the reference's stream, which simulates them."""
    cfg = CONFIGS["next_gate fifo cold max_rank mat42 drop"]
    cfg = dataclasses.replace(cfg, policy=PolicyConfig(warmup="pcw"))  # replayable
    loaded = load(cfg)
    aware = dataclasses.replace(cfg, policy=PolicyConfig(routing="cache_prior", lam=0.1))
    simulates = [
        g.simulate
        for c in (cfg, aware)
        for g in Simulator([on(c, "tensor")], loaded, record=True, streams_only=True).groups
    ]
    assert simulates == [False, True]
    want, got = record(on(cfg, "python"), loaded), record(on(cfg, "tensor"), loaded)
    assert want.experts.size > 1000
    for name in ("prompt_len", "prefill_counts", "decode_steps", "experts", "high",
                 "next_gate", "next_gate_critical"):  # fmt: skip
        assert np.array_equal(getattr(want, name), getattr(got, name)), name
    assert want.scores == got.scores


# One MoE layer step, no model: 4 experts, top-3 renormalised; the chosen experts' gate weights
# are 0.6, 0.3 and 0.1 (a softmax of their logs), on each of two devices.
STEP_SHAPE = Shape(num_moe_layers=1, num_experts=4, top_k=3, hidden=32, moe_intermediate=32)
STEP_LOGITS = torch.tensor([0.6, 0.3, 0.1, 1e-9]).log().repeat(2, 1)


def one_layer_step(backend: str, policy: PolicyConfig, bits: BitsConfig, held: list):
    """The gate weights and virtual experts a runtime hands the model, and each device's
    counters (COUNTERS, by name), after one decode layer step with the slices held[b] = [(expert,
    kind), ...] in device b's cache, which has room for every slice."""
    hw = HardwareConfig()
    fp = footprint(Dims(1, 1, 1, 1), STEP_SHAPE, bits, hw)
    capacity = 4 * sum(fp.sizes.values())
    caches = [SliceCache(capacity, fp.sizes, 1, 4) for _ in held]
    for cache, keys in zip(caches, held):
        for expert, kind in keys:
            cache.insert((0, expert, kind))
    rules = (Gate(3, norm_topk=True), fp, policy, hw)
    if backend == "python":
        rt = Runtime(*rules)
    else:
        rt = TensorRuntime(*rules, capacity=capacity, eviction="lru")
    rows = len(held)
    state = rt.begin(caches, torch.ones((rows, 1), dtype=torch.bool), range(rows))
    rt.to_decode(state, caches, np.ones(rows, dtype=int), np.ones(rows, dtype=int))
    rt.begin_step(state, 0, np.ones(rows, dtype=bool))
    with rt.bound(state):
        w, virt = rt.routed(0, STEP_LOGITS, None, None)
    rt.end_step(state)
    counters = rt.history(state, 1)[0][0]
    return w, virt, {name: counters[:, COL[name]] for name in COUNTERS}, fp


@pytest.mark.parametrize("backend", ["python", "tensor"])
def test_drop_leaves_out_missed_experts_below_the_threshold_by_hand(backend):
    """drop_below=0.35, every call on the low path (MSB). Device 0 holds experts 0 and 2: expert
    1 (0.3) misses and is dropped, 0.6 and 0.1 scale back to their sum, 1. Device 1 holds
    nothing: 1 and 2 are dropped, the highest-scoring expert 0 is fetched and weighs 1."""
    held = [[(0, "MSB"), (2, "MSB")], []]
    runs = {
        m: one_layer_step(backend, PolicyConfig(precision="low", on_miss=m, drop_below=0.35),
                          BitsConfig(), held)
        for m in ("drop", "fetch")
    }  # fmt: skip
    (w, _, drop, fp), (w_fetch, _, fetch, _) = runs["drop"], runs["fetch"]
    assert torch.allclose(w, torch.tensor([[0.6 / 0.7, 0, 0.1 / 0.7], [1, 0, 0]]))
    assert torch.allclose(w_fetch, torch.tensor([[0.6, 0.3, 0.1]] * 2))
    assert drop["dropped_calls"].tolist() == [1, 2] and fetch["dropped_calls"].tolist() == [0, 0]
    # Every lookup is a request; a dropped one's miss moves nothing.
    assert drop["requests_MSB"].tolist() == [3, 3] and drop["misses_MSB"].tolist() == [1, 3]
    assert drop["flash_bytes"].tolist() == [0, fp.sizes["MSB"]]
    assert fetch["flash_bytes"].tolist() == [fp.sizes["MSB"], 3 * fp.sizes["MSB"]]
    # A dropped expert is neither read from DRAM nor computed.
    assert (fetch["dram_bytes"] - drop["dram_bytes"]).tolist() == [
        fp.low_bytes + fp.sizes["MSB"], 2 * (fp.low_bytes + fp.sizes["MSB"])
    ]  # fmt: skip
    assert (drop["ops"] < fetch["ops"]).all()


@pytest.mark.parametrize("backend", ["python", "tensor"])
@pytest.mark.parametrize("scheme", ["amat", "base"])
def test_substitute_serves_a_critical_expert_from_its_resident_low_bit_slice(backend, scheme):
    """DBSC marks expert 0 (0.6) critical. Device 0 holds only its low-bit slice (the MSB, or
    base's low-bit copy): substitute computes it on the low path and leaves its high-bit part
    (the LSB, or the FULL copy) in Flash, which fetch reads. Device 1 holds the high-bit expert:
    both compute it high. Experts 1 and 2 are low-bit calls that miss either way."""
    high = [(0, "MSB"), (0, "LSB")] if scheme == "amat" else [(0, "FULL")]
    held = [[(0, "MSB")], high]
    runs = {
        m: one_layer_step(backend, PolicyConfig(on_miss=m), BitsConfig(scheme=scheme), held)
        for m in ("substitute", "fetch")
    }
    (_, virt, sub, fp), (_, virt_fetch, fetch, _) = runs["substitute"], runs["fetch"]
    assert virt[:, 0].tolist() == [0 + 4, 0] and virt_fetch[:, 0].tolist() == [0, 0]
    assert sub["highbit_calls"].tolist() == [0, 1] and fetch["highbit_calls"].tolist() == [1, 1]
    part = fp.sizes["LSB" if scheme == "amat" else "FULL"]
    assert (fetch["flash_bytes"] - sub["flash_bytes"]).tolist() == [part, 0]
    assert (fetch["dram_bytes"] - sub["dram_bytes"]).tolist() == [
        part + fp.sizes["FULL"] - fp.low_bytes, 0
    ]  # fmt: skip


def test_the_static_kv_cache_scores_like_the_dynamic_one(monkeypatch):
    """Teacher-forced NLLs of left-padded rows of different lengths, and the caches' counters,
    with the static cache and the simulator's own masks against transformers' dynamic cache;
    and with the static cache's prefill in pieces of 2 positions (as a large batch's is)."""
    from slicemoe import simulator

    cfg = RunConfig(model=ModelConfig(backend="tensor"), cache=CacheConfig(frac=0.2))
    loaded = load(cfg)
    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (30, 12, 21)]
    split = [9, 3, 14]
    prompts, forced = [r[:s] for r, s in zip(rows, split)], [r[s:] for r, s in zip(rows, split)]
    results = []
    for static, budget in ((False, None), (True, None), (True, 6)):
        if budget:
            monkeypatch.setattr(simulator, "PREFILL_TOKENS", budget)
        sim = Simulator(cfg, loaded, static=static)
        (group,) = sim.groups
        nll = sim.loglikelihood(range(len(prompts)), prompts, forced)
        results.append((nll, group.rows(), group.prefill_cost))
    nll_d, rows_d, prefill_d = results[0]
    # On CUDA the two caches' attention calls take different SDPA kernels (the dynamic cache
    # passes transformers' own mask, the static one an explicit additive mask), whose float32
    # sums differ in the fourth significant digit (3.0e-3 on an NLL of 9.8 on an H100 with the
    # norms fused, 1.3e-3 without); a mask one slot off moves an NLL by more than 2.
    tolerance = 1e-4 if loaded.device.type == "cpu" else 5e-3
    for nll, rows_, prefill in results[1:]:
        for a, b in zip(nll_d, nll):
            assert b == pytest.approx(a, abs=tolerance)
        assert np.array_equal(rows_d, rows_)  # requests, misses, calls, bytes, cost
        assert prefill == prefill_d  # the prefill counts, their stream and bill


def importlib_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_on_cuda_the_captured_step_replays_the_eager_one_and_the_runtimes_agree():
    """On CUDA (experts as codes): the CUDA-graph decode equals the eager one bit for bit, and
    the device runtime equals the reference on the same (dynamic) KV cache."""
    cfg = RunConfig(
        model=ModelConfig(backend="tensor"),
        policy=PolicyConfig(routing="cache_prior", lam=0.1, warmup="pcw"),
        prefetch=PrefetchConfig(predictor="prev_token", slices="critical"),
        cache=CacheConfig(frac=0.2),
    )
    loaded = load(cfg)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (17, 9, 30, 22)]
    out = {}
    for name, backend, static, graphs in (
        ("graph", "tensor", True, True),
        ("eager", "tensor", True, False),
        ("tensor dynamic", "tensor", False, False),
        ("python dynamic", "python", False, False),
    ):
        sim = Simulator(on(cfg, backend), loaded, static=static, capture=graphs)
        assert sim.graphs == graphs
        texts = sim.generate_until(range(len(prompts)), prompts, stop=("\n\n",), max_new=40)
        out[name] = texts, sim.groups[0].rows()
    assert out["graph"][0] == out["eager"][0]
    assert np.array_equal(out["graph"][1], out["eager"][1])
    assert out["tensor dynamic"][0] == out["python dynamic"][0]
    want, got = out["python dynamic"][1], out["tensor dynamic"][1]
    assert want.shape == got.shape and want[:, 0].sum() > 100
    assert np.allclose(got, want, rtol=1e-9, atol=0)


@cuda
def test_on_cuda_the_routing_beside_the_block_changes_nothing(monkeypatch):
    """Each block's routing on a second stream (slicemoe.models.adapter.BESIDE) and the
    request stream's recording on a third (tensor_runtime.RECORD_ASIDE) give the one-stream
    run's texts, counters and request stream, captured or eager."""
    import slicemoe.models.adapter
    import slicemoe.tensor_runtime

    cfg = RunConfig(
        model=ModelConfig(backend="tensor"),
        policy=PolicyConfig(routing="cache_prior", lam=0.1, warmup="pcw"),
        prefetch=PrefetchConfig(predictor="next_gate", slices="critical"),
        cache=CacheConfig(frac=0.2),
    )
    replayable = RunConfig(
        eval=EVAL, model=ModelConfig(backend="tensor"), policy=PolicyConfig(warmup="pcw")
    )
    loaded = load(cfg)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 40, (n,), generator=g).tolist() for n in (17, 9, 30, 22)]
    out = {}
    for beside in (True, False):
        monkeypatch.setattr(slicemoe.models.adapter, "BESIDE", beside)
        monkeypatch.setattr(slicemoe.tensor_runtime, "RECORD_ASIDE", beside)
        for graphs in (True, False):
            sim = Simulator(cfg, loaded, capture=graphs)
            assert sim.graphs == graphs
            texts = sim.generate_until(range(len(prompts)), prompts, stop=("\n\n",), max_new=40)
            out[beside, graphs] = texts, sim.groups[0].rows()
        out[beside, "stream"] = record(replayable, loaded)
    for graphs in (True, False):
        assert out[True, graphs][0] == out[False, graphs][0]
        assert np.array_equal(out[True, graphs][1], out[False, graphs][1])
    want, got = out[False, "stream"], out[True, "stream"]
    assert want.experts.size > 1000
    for name in ("prefill_counts", "experts", "high", "next_gate", "next_gate_critical"):
        assert np.array_equal(getattr(want, name), getattr(got, name)), name


# Operations that wait for the device (a value read back, a data-dependent shape) or copy
# host data in: none may run inside a decode step that is captured as a CUDA graph.
HOST_SYNC = {"_local_scalar_dense", "nonzero", "unique", "_unique2", "unique_dim",
             "unique_consecutive", "masked_select", "lift_fresh", "lift_fresh_copy"}  # fmt: skip


class HostSyncs:
    """Records every HOST_SYNC operation run while it is on and not paused."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self
        self.seen, self.paused = [], 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func._schema.name.split("::")[-1]
                if not outer.paused and name in HOST_SYNC:
                    outer.seen.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def pause(self, fn):
        def paused(*args, **kwargs):
            self.paused += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused -= 1

        return paused


def test_the_device_decode_step_never_waits_for_the_host(monkeypatch):
    """What the CUDA graph captures, checked op by op on the CPU: a decode step of the device
    runtime with the static KV cache (token choice, model, routing with the cache, DBSC, the
    controller, prefetching, the stream, the hardware bill). On CUDA the experts and the cache
    layer step are Triton kernels; here their CPU references run unchecked, and the kernels'
    wrappers are checked below."""
    from slicemoe.models.code_experts import CodeExperts
    from slicemoe.tensor_runtime import TensorRuntime

    cfg = RunConfig(
        model=ModelConfig(backend="tensor"),
        policy=PolicyConfig(
            routing="cache_prior", lam=0.1, lam_scale="running", miss_rate_target=0.05, tau=0.3
        ),
        prefetch=PrefetchConfig(predictor="prev_token", slices="critical"),
    )
    loaded = load(cfg)
    syncs = HostSyncs()
    monkeypatch.setattr(TensorRuntime, "layer_step", syncs.pause(TensorRuntime.layer_step))
    monkeypatch.setattr(CodeExperts, "forward", syncs.pause(CodeExperts.forward))
    for block in loaded.model.model.layers:  # the dequantized copies' (CPU) expert compute
        monkeypatch.setattr(block.mlp.experts, "forward", syncs.pause(block.mlp.experts.forward))
    routing_only = dataclasses.replace(cfg, policy=PolicyConfig(precision="dbsc", tau=0.3))
    for c, streams_only in [
        *((dataclasses.replace(cfg, prefetch=PrefetchConfig(predictor=p)), False)
          for p in ("prev_token", "next_gate")),
        (routing_only, True),  # a stream recorded with no cache simulated
    ]:  # fmt: skip
        sim = Simulator(c, loaded, record=True, streams_only=streams_only)
        assert sim.groups[0].simulate != streams_only
        assert sim.static
        with torch.no_grad():
            batch = sim.prefill([0, 1], [[5, 6, 7, 8], [9, 10]], steps=np.array([12, 12]))
            with syncs.mode:
                for _ in range(12):
                    sim.decode_step(batch, np.ones(2, dtype=bool))
        assert syncs.seen == [], (c.prefetch.predictor, streams_only, syncs.seen)


def test_a_prefill_piece_attends_to_its_own_slots_without_cudnn(monkeypatch):
    """A static-cache prefill piece's attention gets the slots up to the piece's end (the later
    ones hold nothing yet) and may not take cuDNN's kernel (a plan build for each new shape);
    a decode step gets every slot, cuDNN allowed (one shape a batch, captured once)."""
    from slicemoe import simulator

    monkeypatch.setattr(simulator, "PREFILL_TOKENS", 8)  # 2 rows: pieces of 4 positions
    cfg = RunConfig(model=ModelConfig(backend="tensor"))
    loaded = load(cfg)  # before the spy: on CUDA, load runs a pass of its own (compile_ahead)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def seen(query, key, value, attn_mask=None, **kw):
        calls.append((key.shape[2], attn_mask.shape[-1], torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", seen)
    sim = Simulator(cfg, loaded, capture=False)
    layers = len(sim.model.model.layers)
    with torch.no_grad():
        batch = sim.prefill([0, 1], [[5, 6, 7, 8, 9, 10], [9, 10]], steps=np.array([3, 3]))
        prefill, calls[:] = calls[:], []
        sim.decode_step(batch, np.ones(2, dtype=bool))
    ends = [4] * layers + [6] * layers  # two pieces of the 6 prompt positions
    assert prefill == [(end, end, False) for end in ends]
    assert calls == [(6 + 3, 6 + 3, True)] * layers


def test_the_host_reads_a_check_once_the_next_step_is_queued(monkeypatch):
    """With the device runtime the host's stop check of step t (detokenising every row) runs
    while step t + 1 is queued behind the tokens' copy; the reference reads each step at once.
    Either way the texts are the same."""
    from slicemoe import simulator

    events = []
    to_host = simulator._to_host

    def logged(t):
        copy, step = to_host(t), t.shape[1] - 1
        return lambda: events.append(("read", step)) or copy()

    monkeypatch.setattr(simulator, "_to_host", logged)
    step = Simulator.decode_step

    def stepped(self, batch, *args, **kw):
        events.append(("step", batch.step))
        step(self, batch, *args, **kw)

    monkeypatch.setattr(Simulator, "decode_step", stepped)
    texts = {}
    for backend in ("tensor", "python"):
        loaded = load(RunConfig(model=ModelConfig(backend=backend)))
        sim = Simulator(RunConfig(model=ModelConfig(backend=backend)), loaded)
        events.clear()
        texts[backend] = sim.generate_until([0, 1], [[5, 6, 7, 8], [9, 10]], max_new=20)
        reads = [(i, s) for i, (kind, s) in enumerate(events) if kind == "read"]
        every, lag = (1, 0) if backend == "python" else (simulator.CHECK_EVERY, 1)
        assert [s for _, s in reads] == [*range(every - 1, 19, every), 19]
        for i, s in reads:
            queued = [e for kind, e in events[:i] if kind == "step"]
            assert queued[-1] == min(s + lag, 19), (backend, s, queued[-1])
    assert texts["tensor"] == texts["python"]


@pytest.mark.skipif(not torch.cuda.is_available() and not importlib_triton(), reason="no Triton")
def test_the_kernels_wrappers_never_wait_for_the_host():
    """The host side of both Triton kernels (row sorting and launches) is capturable too."""
    from slicemoe.kernels.expert_gemm import align, aligned

    syncs = HostSyncs()
    v = torch.tensor([3, 1, 3, 0, 5, 1, 1, 2])
    on_device = v.to("cuda" if torch.cuda.is_available() else "cpu")
    with syncs.mode:
        ids, blocks = align(v, 6, 4)
        aligned(on_device, 6, 4)
    assert syncs.seen == []
    # Every pair sits in a block of its own expert; padding holds the out-of-range index.
    for b, e in enumerate(blocks.tolist()):
        rows = ids[4 * b : 4 * b + 4]
        pairs = rows[rows < len(v)]
        if e < 6:
            assert len(pairs) and (v[pairs] == e).all()
        else:
            assert not len(pairs)
    assert sorted(ids[ids < len(v)].tolist()) == list(range(len(v)))
