"""The device runtime (model.backend=tensor) against the reference (python) on the CPU: whole
runs on the tiny model give the same metrics and curves, recorded request streams are the same,
and the static KV cache (the CUDA-graph path, run eagerly here) scores like the dynamic one."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

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
from slicemoe.run import load, record, run
from slicemoe.simulator import Simulator

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
            routing="cache_prior", lam=0.1, miss_rate_target=0.05, lsb_miss="skip", tau=0.3
        ),
        prefetch=PrefetchConfig(predictor="prev_token", slices="critical"),
        cache=CacheConfig(frac=0.15, eviction="lfu"),
        eval=EVAL,
    ),
    "next_gate fifo cold max_rank mat42": RunConfig(
        bits=BitsConfig(high=4, low=2),
        policy=PolicyConfig(routing="max_rank", warmup="random"),
        prefetch=PrefetchConfig(predictor="next_gate", top_m=6, slices="critical", insert="lru"),
        cache=CacheConfig(frac=0.2, eviction="fifo"),
        eval=EVAL,
    ),
    "base cumsum laptop overlap": RunConfig(
        bits=BitsConfig(scheme="base"),
        policy=PolicyConfig(routing="cumsum", cumsum_p=0.6, warmup="last_layer", tau=0.2),
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
    cfg = CONFIGS["next_gate fifo cold max_rank mat42"]
    cfg = dataclasses.replace(cfg, policy=PolicyConfig(warmup="pcw"))  # replayable
    loaded = load(cfg)
    want, got = record(on(cfg, "python"), loaded), record(on(cfg, "tensor"), loaded)
    assert want.experts.size > 1000
    for name in ("prompt_len", "prefill_counts", "decode_steps", "experts", "high",
                 "next_gate", "next_gate_critical"):  # fmt: skip
        assert np.array_equal(getattr(want, name), getattr(got, name)), name
    assert want.scores == got.scores


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
        results.append((sim.loglikelihood(0, prompts, forced), group.rows(), group.prefill_cost))
    nll_d, rows_d, prefill_d = results[0]
    # On CUDA the two caches' attention calls take different SDPA kernels (the dynamic cache
    # passes transformers' own mask, the static one an explicit additive mask), whose float32
    # sums differ in the fourth significant digit (1.3e-3 on an NLL of 7 on an H100); a slot
    # or mask off by one would move an NLL by far more.
    tolerance = 1e-4 if loaded.device.type == "cpu" else 2e-3
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
        texts = sim.generate_until(0, prompts, stop=("\n\n",), max_new=40)
        out[name] = texts, sim.groups[0].rows()
    assert out["graph"][0] == out["eager"][0]
    assert np.array_equal(out["graph"][1], out["eager"][1])
    assert out["tensor dynamic"][0] == out["python dynamic"][0]
    want, got = out["python dynamic"][1], out["tensor dynamic"][1]
    assert want.shape == got.shape and want[:, 0].sum() > 100
    assert np.allclose(got, want, rtol=1e-9, atol=0)


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
    for predictor in ("prev_token", "next_gate"):
        c = dataclasses.replace(cfg, prefetch=PrefetchConfig(predictor=predictor))
        sim = Simulator(c, loaded, record=True)
        assert sim.static
        with torch.no_grad():
            batch = sim.prefill(0, [[5, 6, 7, 8], [9, 10]], steps=np.array([12, 12]))
            with syncs.mode:
                for _ in range(12):
                    sim.decode_step(batch, np.ones(2, dtype=bool))
        assert syncs.seen == [], (predictor, syncs.seen)


@pytest.mark.skipif(not torch.cuda.is_available() and not importlib_triton(), reason="no Triton")
def test_the_kernels_wrappers_never_wait_for_the_host():
    """The host side of both Triton kernels (row sorting and launches) is capturable too."""
    import os

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from slicemoe.kernels.expert_gemm import align

    syncs = HostSyncs()
    v = torch.tensor([3, 1, 3, 0, 5, 1, 1, 2])
    with syncs.mode:
        ids, blocks = align(v, 6, 4)
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
