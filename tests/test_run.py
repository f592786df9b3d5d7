"""One run end to end on the shipped tiny model."""

from dataclasses import replace

import pandas as pd
import pytest

from slicemoe.config import BitsConfig, CacheConfig, EvalConfig, PolicyConfig, RunConfig
from slicemoe.run import METRICS, ConfigError, load, run, validate


@pytest.fixture(scope="module")
def loaded():
    return load(RunConfig())


def cfg(**kw) -> RunConfig:
    base = RunConfig(eval=EvalConfig(limit=6, max_new_tokens=40), batch_size=3)
    return replace(base, **kw)


def test_every_metric_is_reported(loaded):
    r = run(cfg(), loaded)
    assert set(METRICS) <= set(r)
    assert 0 <= r["accuracy"] <= 1 and r["decode_tokens"] > 0 and r["prefill_tokens"] > 0
    assert r["energy_decode_j"] == pytest.approx(
        r["energy_decode_compute_j"] + r["energy_decode_dram_j"] + r["energy_decode_flash_j"]
    )
    assert len(r["curves"]["miss_rate_running"]) == len(r["curves"]["energy_decode_cum_j"]) > 0


def test_batched_sequences_match_one_at_a_time(loaded, tmp_path):
    """Each row of a batch is its own device: same cache events and metrics as running alone.
    The prompts differ in length, so padding is present and must never reach the cache."""
    runs = {}
    for b in (1, 3):
        c = cfg(batch_size=b, trace=True, trace_path=str(tmp_path / f"b{b}.parquet"))
        r = run(c, loaded)
        runs[b] = (r, pd.read_parquet(r["trace_path"]))
    (r1, t1), (r3, t3) = runs[1], runs[3]
    key = ["sequence", "phase", "step"]
    pd.testing.assert_frame_equal(
        t1.sort_values(key, kind="stable").reset_index(drop=True),
        t3.sort_values(key, kind="stable").reset_index(drop=True),
    )
    for m in METRICS:
        if m != "wall_s":
            assert r1[m] == pytest.approx(r3[m], rel=1e-9, nan_ok=True), m


def test_trace_has_the_documented_columns(loaded, tmp_path):
    r = run(cfg(trace=True, trace_path=str(tmp_path / "t.parquet")), loaded)
    t = pd.read_parquet(r["trace_path"])
    assert list(t.columns) == [
        "sequence",
        "phase",
        "step",
        "layer",
        "expert",
        "slice",
        "bytes",
        "hit",
    ]
    assert set(t.phase) == {"prefill", "decode"} and set(t.slice) <= {"MSB", "LSB"}
    # Decode requests counted after the warm-up window equal the run's statistics.
    counted = t[(t.phase == "decode") & (t.step >= 10)]
    assert 1 - counted.hit.mean() == pytest.approx(r["miss_rate"])


def small_cache(policy: PolicyConfig, bits: BitsConfig | None = None, limit=6) -> RunConfig:
    return cfg(
        policy=policy,
        bits=bits or BitsConfig(),
        cache=CacheConfig(frac=0.25),
        eval=EvalConfig(limit=limit),
    )


MAT42 = BitsConfig(name="mat42", high=4, low=2)


def test_dbsc_beats_highbit_lru_on_misses_and_lowbit_on_accuracy(loaded):
    """The SliceMoE trade-off on the tiny model at equal cache bytes: MAT42's 2-bit low path
    costs accuracy, DBSC's few high-bit experts win most of it back with far fewer misses than
    caching whole high-bit experts."""
    loaded42 = load(small_cache(PolicyConfig(), MAT42))
    runs = {
        name: run(small_cache(PolicyConfig(name=name, precision=prec), MAT42, limit=12), loaded42)
        for name, prec in [("lru_highbit", "high"), ("lru_lowbit", "low"), ("dbsc", "dbsc")]
    }
    high, low, dbsc = runs["lru_highbit"], runs["lru_lowbit"], runs["dbsc"]
    assert 0 < dbsc["highbit_fraction"] < 0.5
    assert dbsc["miss_rate_hbn"] < high["miss_rate_hbn"]
    assert dbsc["accuracy"] > low["accuracy"]
    assert high["accuracy"] > low["accuracy"]


def test_unquantized_experts_run(loaded):
    r = run(
        cfg(
            bits=BitsConfig(name="fp16", high=None, low=None), policy=PolicyConfig(precision="high")
        )
    )
    assert r["highbit_fraction"] == 1.0 and r["miss_rate_lsb"] != r["miss_rate_lsb"]  # NaN


def test_pcw_has_fewer_early_decode_misses_than_empty_and_random(loaded, tmp_path):
    early = {}
    for w in ("pcw", "empty", "random"):
        c = small_cache(PolicyConfig(warmup=w, warmup_steps=0))
        c = replace(c, trace=True, trace_path=str(tmp_path / f"{w}.parquet"))
        t = pd.read_parquet(run(c, loaded)["trace_path"])
        d = t[(t.phase == "decode") & (t.step < 10)]
        early[w] = int((~d.hit).sum())
    assert early["pcw"] < early["empty"] and early["pcw"] < early["random"]


def test_belady_oracle_bounds_lru(loaded):
    lru = run(small_cache(PolicyConfig(precision="high")), loaded)
    opt = run(
        replace(
            small_cache(PolicyConfig(precision="high")),
            cache=CacheConfig(frac=0.25, eviction="belady"),
        ),
        loaded,
    )
    assert opt["miss_rate"] <= lru["miss_rate"]
    assert opt["accuracy"] == lru["accuracy"]


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(bits=BitsConfig(high=4, low=4)), "bits.low"),
        (
            dict(bits=BitsConfig(high=None, low=None), policy=PolicyConfig(precision="dbsc")),
            "policy.precision",
        ),
        (dict(cache=CacheConfig(frac=None, bytes=1000)), "cache"),
        (dict(cache=CacheConfig(frac=0.2, bytes=1000)), "cache"),
        (dict(policy=PolicyConfig(routing="nope")), "policy.routing"),
        (
            dict(policy=PolicyConfig(routing="cache_prior"), cache=CacheConfig(eviction="belady")),
            "cache.eviction",
        ),
        (dict(eval=EvalConfig(task="gsm8k", data_path="/nonexistent/gsm8k")), "eval.data_path"),
        (dict(eval=EvalConfig(task="nope")), "eval.task"),
    ],
)
def test_bad_configs_fail_fast_naming_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        validate(replace(RunConfig(), **change))
    assert err.value.field == field


def test_missing_model_path_names_model_path(tmp_path):
    from slicemoe.config import ModelConfig

    with pytest.raises(ConfigError, match="model.path"):
        validate(RunConfig(model=ModelConfig(path=str(tmp_path / "none"))))


def test_lambda_controller_pushes_the_miss_rate_toward_its_target(loaded):
    """cache_prior starting at lam=0 (= top-k): the controller raises lam on each device until
    its high-bit-normalised miss rate comes down toward the target."""
    base = small_cache(PolicyConfig(routing="cache_prior", precision="high", lam=0.0))
    free = run(base, loaded)
    target = free["miss_rate_hbn"] / 4
    held = run(replace(base, policy=replace(base.policy, miss_rate_target=target)), loaded)
    assert held["miss_rate_hbn"] < free["miss_rate_hbn"] / 2
