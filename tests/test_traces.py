"""Router traces at real models' shapes, with no weights: what a trace must hold, what each
missing field refuses. (The round trip of a recorded stream is in test_replay.py, beside the
recorded stream; a sweep over a trace in test_sweep_units.py, beside its tracking store.)"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from slicemoe.config import CacheConfig, PolicyConfig, PrefetchConfig, RunConfig
from slicemoe.models import config_dir, read_shape
from slicemoe.run import run
from slicemoe.traces import FORMAT, VERSION, TraceError, file_sha256, import_trace, model_config
from slicemoe.validate import ConfigError, validate


def write(path, model: str, seqs=2, steps=12, drop=(), seed=0, **change):
    """A random trace at `model`'s shape (its shipped config.json) with every field, less
    `drop`; `change` replaces arrays."""
    s = read_shape(config_dir(model, None))
    layers, num, k = s.num_moe_layers, s.num_experts, s.top_k
    rng = np.random.default_rng(seed)
    n = seqs * steps
    # Each token's k distinct experts: the first k of a random permutation.
    experts = np.argsort(rng.random((n, layers, num)), axis=-1)
    weights = rng.random((n, layers, k))
    arrays = {
        "prompt_len": np.full(seqs, 20),
        "decode_steps": np.full(seqs, steps),
        "experts": experts[..., :k],
        "prefill_counts": rng.integers(0, 3, (seqs, layers, num)),
        "gate_scores": weights / weights.sum(-1, keepdims=True),
        "next_gate": np.concatenate(
            [experts[:, 1:, : min(num, 16)], np.full((n, 1, min(num, 16)), -1)], axis=1
        ),
        "next_gate_scores": weights / weights.sum(-1, keepdims=True),
    }
    arrays.update(change)
    arrays = {name: a for name, a in arrays.items() if name not in drop}
    meta = {"format": FORMAT, "version": VERSION, "source": "test"}
    np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
    return path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return write(tmp_path_factory.mktemp("trace") / "qwen3.npz", "qwen3-30b-a3b")


def at(trace, model="qwen3-30b-a3b", **fields) -> RunConfig:
    return RunConfig(model=model_config(model), stream_file=str(trace), **fields)


def test_a_trace_replays_at_the_real_models_shape_without_weights(qwen3):
    stream = import_trace(qwen3, model="qwen3-30b-a3b")
    assert stream.shape.num_experts == 128 and stream.shape.top_k == 8
    assert stream.config["stream_file_sha256"] == file_sha256(qwen3)
    cfg = at(qwen3, cache=CacheConfig(frac=0.3))
    result = run(cfg)  # no model.path: the shipped config.json only
    assert 0 < result["miss_rate"] < 1 and result["energy_decode_j_per_token"] > 0
    assert math.isnan(result["batch_rows"])
    # DBSC's high-bit flags come from the gate scores at the config's tau.
    low, high = (run(at(qwen3, policy=PolicyConfig(tau=t))) for t in (0.9, 0.0))
    assert low["highbit_fraction"] < 0.05 and high["highbit_fraction"] == 1


def test_a_missing_field_refuses_exactly_the_settings_that_read_it(tmp_path, qwen3):
    bare = write(tmp_path / "bare.npz", "qwen3-30b-a3b", drop=(
        "prefill_counts", "gate_scores", "next_gate", "next_gate_scores"
    ))  # fmt: skip
    fixed = PolicyConfig(precision="high", warmup="empty")
    validate(at(bare, policy=fixed))
    assert run(at(bare, policy=replace(fixed, precision="low")))["highbit_fraction"] == 0
    refusals = {
        "policy.precision": (PolicyConfig(warmup="empty"), PrefetchConfig()),
        "policy.warmup": (replace(fixed, warmup="pcw"), PrefetchConfig()),
        "prefetch.predictor": (fixed, PrefetchConfig(name="ng", predictor="next_gate")),
    }
    for field, (policy, prefetch) in refusals.items():
        with pytest.raises(ConfigError, match=field):
            validate(at(bare, policy=policy, prefetch=prefetch))
        validate(at(qwen3, policy=policy, prefetch=prefetch))  # the full trace serves it
    critical = PrefetchConfig(name="ng", predictor="next_gate", slices="critical")
    no_scores = write(tmp_path / "ns.npz", "qwen3-30b-a3b", drop=("next_gate_scores",))
    with pytest.raises(ConfigError, match="prefetch.slices"):
        validate(at(no_scores, prefetch=critical))
    with pytest.raises(ConfigError, match="policy.routing"):
        validate(at(qwen3, policy=PolicyConfig(routing="cache_prior", lam=0.2)))


def test_a_trace_that_does_not_fit_the_model_is_refused(tmp_path, qwen3):
    with pytest.raises(TraceError, match=r"experts has shape \(24, 48, 8\).*\(24, 32, 2\)"):
        import_trace(qwen3, model="mixtral-8x7b")
    bad = np.zeros((24, 48, 8), int)
    for name, arrays, message in (
        ("dup", {"experts": bad}, "chose one expert twice"),
        ("range", {"experts": bad + np.arange(8) + 121}, r"integers in \[0, 128\)"),
        ("neg", {"prompt_len": np.array([-1, 3])}, "prompt_len must hold integers >= 0"),
    ):
        with pytest.raises(TraceError, match=message):
            import_trace(
                write(tmp_path / f"{name}.npz", "qwen3-30b-a3b", **arrays), "qwen3-30b-a3b"
            )
    np.savez(tmp_path / "other.npz", experts=bad)
    with pytest.raises(ConfigError, match="stream_file: .*no `meta`"):
        validate(at(tmp_path / "other.npz"))


def test_the_fit_of_a_synthetic_trace_recovers_its_parameters(tmp_path):
    """slicemoe.synthetic at Qwen3-30B-A3B's shape: seeded, its parameters logged in the trace,
    and fit() finds them again (the reuse estimate runs low by up to about 0.05: a kept expert
    may also have been drawn fresh)."""
    from slicemoe.synthetic import Workload, fit, synthesize

    shape = read_shape(config_dir("qwen3-30b-a3b", None))
    w = Workload(zipf=0.8, reuse=0.4, prompt_len=12)
    a, b = (synthesize(shape, w, 8, 100, tmp_path / f"{i}.npz", seed=3) for i in "ab")
    assert a.read_bytes() == b.read_bytes()
    stream = import_trace(a, "qwen3-30b-a3b")
    assert json.loads(str(np.load(a)["meta"]))["synthetic"]["zipf"] == 0.8
    got = fit(stream)
    assert abs(got.zipf - 0.8) < 0.1 and 0.3 < got.reuse <= 0.4 and got.prompt_len == 12
