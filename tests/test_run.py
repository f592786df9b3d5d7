"""One run end to end on the shipped tiny model."""

import json
from dataclasses import replace

import pandas as pd
import pytest

from slicemoe.config import (
    BitsConfig,
    CacheConfig,
    EvalConfig,
    ModelConfig,
    PolicyConfig,
    RunConfig,
)
from slicemoe.models import read_shape
from slicemoe.run import (
    METRICS,
    ConfigError,
    capacity_bytes,
    load,
    record,
    replay,
    run,
    validate,
)


@pytest.fixture(scope="module")
def loaded():
    return load(RunConfig())


@pytest.fixture(scope="module")
def stream(loaded):
    """small_cache's request stream at a precision, recorded once: with top-k routing it is the
    same for every warmup, cache size and eviction, so their runs are replays of it (replay
    equals the model in the loop: tests/test_replay.py)."""
    streams = {}

    def of(precision: str):
        if precision not in streams:
            streams[precision] = record(small_cache(PolicyConfig(precision=precision)), loaded)
        return streams[precision]

    return of


def cfg(**kw) -> RunConfig:
    base = RunConfig(eval=EvalConfig(limit=6, max_new_tokens=40), batch_size=3)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def traced(loaded, tmp_path_factory):
    """cfg()'s run, recording its trace (read by the tests, never changed)."""
    path = tmp_path_factory.mktemp("traced") / "b3.parquet"
    return run(cfg(trace=True, trace_path=str(path)), loaded)


def test_every_metric_is_reported(traced):
    r = traced
    assert set(METRICS) <= set(r)
    assert 0 <= r["accuracy"] <= 1 and r["decode_tokens"] > 0 and r["prefill_tokens"] > 0
    for w in ("", "_steady"):
        assert r[f"energy_decode_j{w}"] == pytest.approx(
            r[f"energy_decode_compute_j{w}"]
            + r[f"energy_decode_dram_j{w}"]
            + r[f"energy_decode_flash_j{w}"]
        )
        assert r[f"energy_decode_j_per_token{w}"] == pytest.approx(
            r[f"energy_decode_j{w}"] / r[f"decode_tokens{w}"]
        )
    # The steady window is the all-steps window less the first warmup_steps steps.
    assert 0 < r["decode_tokens_steady"] < r["decode_tokens"]
    assert 0 < r["flash_bytes_decode_steady"] < r["flash_bytes_decode"]
    curves = r["curves"]
    n = len(curves["miss_rate_running"])
    assert n == len(curves["miss_rate_step"]) == len(curves["energy_decode_cum_j"]) > 10
    assert curves["energy_decode_cum_j"][-1] == pytest.approx(r["energy_decode_j"])
    assert curves["miss_rate_running"][-1] == pytest.approx(r["miss_rate"])
    assert curves["miss_rate_running"][0] == curves["miss_rate_step"][0] > 0


def test_batched_sequences_match_one_at_a_time(loaded, traced, tmp_path):
    """Each row of a batch is its own device: same cache events and metrics as running alone.
    The prompts differ in length, so padding is present and must never reach the cache."""
    r1 = run(cfg(batch_size=1, trace=True, trace_path=str(tmp_path / "b1.parquet")), loaded)
    r3 = traced  # batch_size=3
    t1, t3 = pd.read_parquet(r1["trace_path"]), pd.read_parquet(r3["trace_path"])
    key = ["sequence", "phase", "step"]
    pd.testing.assert_frame_equal(
        t1.sort_values(key, kind="stable").reset_index(drop=True),
        t3.sort_values(key, kind="stable").reset_index(drop=True),
    )
    for m in METRICS:
        if m != "wall_s":
            assert r1[m] == pytest.approx(r3[m], rel=1e-9, nan_ok=True), m
    assert r1["problems"] == r3["problems"]


@pytest.mark.parametrize("task", ["arith", "wikitext"])
def test_a_batch_out_of_gpu_memory_is_retried_halved_as_if_run_so(
    loaded, task, tmp_path, monkeypatch, capsys
):
    """A batch of more than 2 rows runs out of memory (injected) after its prefill and a few
    steps: the run says so with the allocator's words and goes on in batches of 2, and its
    result, trace and request stream are exactly a batch_size=2 run's (a failed batch leaves no
    counts, costs, stream or traces, and its tokens leave the progress told)."""
    import numpy as np
    import torch

    from slicemoe.simulator import Simulator
    from slicemoe.stream import Stream

    c = cfg(trace=True, eval=EvalConfig(limit=6, max_new_tokens=16))
    if task == "wikitext":
        text = tmp_path / "wiki.txt"
        text.write_text(" = Valkyria = \n\n The game began development in 2010 . " * 40)
        wiki = EvalConfig(task="wikitext", data_path=str(text), limit=6, seq_len=24, stride=24)
        c = cfg(trace=True, eval=wiki)
    step = Simulator.decode_step

    def flaky(self, batch, *args, **kw):
        if len(batch.lens) > 2 and batch.step == 5:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        step(self, batch, *args, **kw)

    results, told = {}, []
    for b in (2, 4):
        if b == 4:
            monkeypatch.setattr(Simulator, "decode_step", flaky)
        r = run(replace(c, batch_size=b, trace_path=str(tmp_path / f"b{b}.parquet")), loaded,
                progress=lambda *state, b=b: told.append((b, *state)))  # fmt: skip
        r.pop("wall_s")
        trace = pd.read_parquet(r.pop("trace_path"))
        stream = vars(Stream.load(r.pop("stream_path")))
        del stream["key"], stream["config"]  # they name the configured batch_size
        results[b] = r, trace, stream
    (r2, t2, s2), (r4, t4, s4) = results[2], results[4]
    said = "batch of 4 ran out of GPU memory (CUDA out of memory (injected)); retrying as 2"
    assert said in capsys.readouterr().err
    np.testing.assert_equal(r4, r2)
    assert r4["batch_rows"] == 2
    for b in (2, 4):  # (sequences done, of total, decode tokens) from the start to the end
        states = [state for got, *state in told if got == b]
        assert states[0] == [0, 6, 0] and states[-1] == [6, 6, r2["decode_tokens"]]
        assert [done for done, _, _ in states] == sorted(done for done, _, _ in states)
    pd.testing.assert_frame_equal(t4, t2)
    np.testing.assert_equal(s4, s2)


def test_auto_on_a_gpu_plans_batches_on_the_memory_free_to_this_process(
    loaded, monkeypatch, capsys
):
    """The free memory is what the card has free, within this process's cap, plus the blocks
    the allocator holds unused; the plan is auto_batches' on it, and said."""
    import numpy as np
    import torch

    from slicemoe.batching import auto_batches, sizes
    from slicemoe.run import batch_plan

    gib = 2**30
    fake = {"mem_get_info": lambda d: (10 * gib, 80 * gib), "memory_reserved": lambda d: gib // 4,
            "memory_allocated": lambda d: gib // 8, "current_device": lambda: 0,
            "get_per_process_memory_fraction": lambda i: 1.5 / 80}  # fmt: skip
    for name, fn in fake.items():
        monkeypatch.setattr(torch.cuda, name, fn, raising=False)
    gpu = replace(loaded, device=torch.device("cuda"))
    lens = [200] * 400 + [100] * 600
    plan = batch_plan(cfg(batch_size="auto"), gpu, lens, 64, 1)
    # The cap (1.5 GiB) less what is reserved, plus what is reserved but unused.
    free = int(1.5 * gib) - gib // 4 + gib // 8
    dims = sizes(loaded.model.config, loaded.shape, 4)
    np.testing.assert_equal(plan, auto_batches(free, dims, lens, 64))
    # ... which the blocks reserved but unused change
    assert not np.array_equal(plan, auto_batches(free - gib // 8, dims, lens, 64))
    said = capsys.readouterr().err
    assert f"batches of {plan[0]} to " in said and "(1.4 GiB free on cuda" in said
    assert (batch_plan(cfg(batch_size=6), gpu, lens, 64, 2) == 3).all()


def test_a_single_sequence_out_of_gpu_memory_fails_in_one_clear_error(loaded, monkeypatch):
    import torch

    from slicemoe.simulator import Simulator

    def oom(*args, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")

    monkeypatch.setattr(Simulator, "prefill", oom)
    with pytest.raises(torch.OutOfMemoryError, match=r"^one sequence does not fit.*2.00 GiB$"):
        run(cfg(batch_size=2), loaded)


def test_a_generation_run_carries_its_correctness_per_problem_in_order(loaded):
    """Replayed runs reuse the recorded pass's; the first problems of a longer run are the
    problems of a shorter one (every sequence has a cache of its own)."""
    c = cfg(policy=PolicyConfig(warmup="pcw"))
    r = run(c, loaded)
    p = r["problems"]
    assert p["task"] == "arith" and p["limit"] == 6 and set(p["correct"]) <= {0, 1}
    assert len(p["correct"]) == 6 and sum(p["correct"]) == round(r["accuracy"] * 6)
    assert replay(record(c, loaded), c)["problems"] == p
    short = run(replace(c, eval=replace(c.eval, limit=5)), loaded)["problems"]
    assert short["correct"] == p["correct"][:5] and short["limit"] == 5


def test_sequences_run_longest_prompt_first_and_come_back_in_problem_order(loaded, monkeypatch):
    """Batches take the prompts longest first; each sequence's score, and its requests in the
    stream, are filed under its own problem."""
    from slicemoe.eval import get_task
    from slicemoe.simulator import Simulator

    c = cfg(batch_size=2)
    docs = get_task("arith").docs(c.eval, loaded.tokenizer)
    generate, batches = Simulator.generate_until, []

    def even_right(self, seqs, prompts, *args, **kw):
        """The model's texts, but the even problems' answered right."""
        batches.append((list(seqs), [len(p) for p in prompts]))
        texts = generate(self, seqs, prompts, *args, **kw)
        return [f"#### {docs[s].target}" if s % 2 == 0 else t for s, t in zip(seqs, texts)]

    monkeypatch.setattr(Simulator, "generate_until", even_right)
    lens = [len(loaded.tokenizer(d.prompt)["input_ids"]) for d in docs]
    stream = record(c, loaded)
    ran = [n for _, batch in batches for n in batch]
    assert ran == sorted(lens, reverse=True) and len(set(lens)) > 1
    assert sorted(s for seqs, _ in batches for s in seqs) == list(range(6))
    assert [s for seqs, _ in batches for s in seqs] != list(range(6))  # not in problem order
    assert list(stream.prompt_len) == lens
    assert list(stream.scores["accuracy"]) == [1.0, 0.0] * 3


def test_trace_has_the_documented_columns(traced):
    r = traced
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
    assert t.sequence.is_monotonic_increasing  # in sequence order, whatever order they ran in
    # Every decode request is in the all-steps window; those from step 10 on in the steady one.
    decode = t[t.phase == "decode"]
    assert 1 - decode.hit.mean() == pytest.approx(r["miss_rate"])
    assert decode.bytes[~decode.hit].sum() == r["flash_bytes_decode"]
    steady = decode[decode.step >= 10]
    assert 1 - steady.hit.mean() == pytest.approx(r["miss_rate_steady"])
    assert steady.bytes[~steady.hit].sum() == r["flash_bytes_decode_steady"]
    # Prefill Flash bytes are reported apart from decode's.
    prefill = t[t.phase == "prefill"]
    assert prefill.bytes[~prefill.hit].sum() == r["flash_bytes_prefill"]


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
        name: run(small_cache(PolicyConfig(name=name, precision=prec), MAT42), loaded42)
        for name, prec in [("lru_highbit", "high"), ("lru_lowbit", "low"), ("dbsc", "dbsc")]
    }
    high, low, dbsc = runs["lru_highbit"], runs["lru_lowbit"], runs["dbsc"]
    assert 0 < dbsc["highbit_fraction"] < 0.5
    assert dbsc["miss_rate_hbn"] < high["miss_rate_hbn"]
    assert dbsc["accuracy"] > low["accuracy"]
    assert high["accuracy"] > low["accuracy"]


def test_the_loaded_model_keeps_no_graph_outside_no_grad(loaded):
    """No parameter of the loaded model asks for gradients, so a forward pass records no
    autograd graph even where the caller did not turn them off (a benchmark that times the
    simulator's step directly ran out of GPU memory on the activations kept for one)."""
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_unquantized_experts_run(loaded):
    r = run(
        cfg(
            bits=BitsConfig(name="fp16", high=None, low=None), policy=PolicyConfig(precision="high")
        )
    )
    assert r["highbit_fraction"] == 1.0 and r["miss_rate_lsb"] != r["miss_rate_lsb"]  # NaN


def test_pcw_has_fewer_early_decode_misses_than_empty_and_random(stream, tmp_path):
    early = {}
    for w in ("pcw", "empty", "random"):
        c = small_cache(PolicyConfig(warmup=w))
        c = replace(c, trace=True, trace_path=str(tmp_path / f"{w}.parquet"))
        t = pd.read_parquet(replay(stream("dbsc"), c)["trace_path"])
        d = t[(t.phase == "decode") & (t.step < 10)]
        early[w] = int((~d.hit).sum())
    assert early["pcw"] < early["empty"] and early["pcw"] < early["random"]


def test_warmup_shows_in_the_default_all_steps_miss_rate(stream):
    """With the default warmup_steps=10 the reported decode miss rate covers the steps where
    warmup acts, so PCW's advantage over an empty cache is visible in `miss_rate`."""
    r = {w: replay(stream("dbsc"), small_cache(PolicyConfig(warmup=w))) for w in ("pcw", "empty")}
    assert r["pcw"]["miss_rate"] < r["empty"]["miss_rate"]
    assert r["pcw"]["energy_decode_j_per_token"] < r["empty"]["energy_decode_j_per_token"]
    # After the cache has settled both warmups look alike: the difference is early.
    gap_all = r["empty"]["miss_rate"] - r["pcw"]["miss_rate"]
    gap_steady = r["empty"]["miss_rate_steady"] - r["pcw"]["miss_rate_steady"]
    assert gap_steady < gap_all


def test_only_warmups_that_load_unused_experts_read_flash(stream):
    fills = {
        w: replay(stream("dbsc"), small_cache(PolicyConfig(warmup=w)))["flash_bytes_warmup"]
        for w in ("pcw", "random", "lru", "empty")
    }
    assert fills["random"] > 0 and fills["pcw"] == fills["lru"] == fills["empty"] == 0


def test_frac_is_the_same_dram_bytes_for_every_bit_width():
    shape = read_shape(None)
    sizes = {
        name: capacity_bytes(replace(RunConfig(), bits=bits, cache=CacheConfig(frac=0.25)), shape)
        for name, bits in {
            "mat84": BitsConfig(),
            "mat42": BitsConfig(high=4, low=2),
            "fp16": BitsConfig(high=None, low=None),
        }.items()
    }
    assert sizes["mat84"] == sizes["mat42"] == sizes["fp16"]
    # ... a quarter of every routed weight at one byte.
    assert sizes["fp16"] == shape.num_moe_layers * shape.num_experts * shape.expert_params // 4


def test_wikitext_runs_with_its_default_window(loaded, tmp_path):
    """Teacher-forced windows are longer than eval.max_new_tokens; curves follow the steps."""
    text = tmp_path / "wiki.txt"
    text.write_text(" = Valkyria = \n\n The game began development in 2010 . " * 40)
    c = cfg(eval=EvalConfig(task="wikitext", data_path=str(text), limit=2))
    assert c.eval.seq_len == 256 > c.eval.max_new_tokens
    r = run(c, loaded)
    assert 1 < r["perplexity"] < 100 and r["problems"] is None
    assert len(r["curves"]["miss_rate_running"]) > c.eval.max_new_tokens


@pytest.mark.parametrize("precision", ["high", "dbsc"])
def test_belady_oracle_bounds_lru(stream, precision):
    """Also with bit slices: the oracle orders the MSB pool by the recorded MSB requests."""
    c = small_cache(PolicyConfig(precision=precision))
    lru = replay(stream(precision), c)
    opt = replay(stream(precision), replace(c, cache=CacheConfig(frac=0.25, eviction="belady")))
    assert opt["miss_rate_msb"] < lru["miss_rate_msb"]
    assert opt["accuracy"] == lru["accuracy"]
    assert opt["highbit_fraction"] == lru["highbit_fraction"]


def test_base_scheme_caches_two_independent_copies(tmp_path):
    """`base` has no nested slices: a high-bit call needs the whole high-bit copy (FULL), a
    low-bit call the separate low-bit copy (MSB); nothing is an LSB slice."""
    c = replace(
        small_cache(PolicyConfig(tau=0.3), BitsConfig(scheme="base")),
        trace=True,
        trace_path=str(tmp_path / "base.parquet"),
    )
    r = run(c)
    t = pd.read_parquet(r["trace_path"])
    d = t[t.phase == "decode"]
    assert set(d.slice) == {"FULL", "MSB"}
    sizes = dict(zip(t.slice, t.bytes))
    assert sizes["FULL"] > sizes["MSB"]
    # One request per expert call: FULL for the high-bit ones.
    assert (d.slice == "FULL").mean() == pytest.approx(r["highbit_fraction"])


def renamed_field() -> PolicyConfig:
    """A PolicyConfig given the field policy.on_miss replaced, as a notebook may still do."""
    policy = PolicyConfig()
    policy.lsb_miss = "skip"
    return policy


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
        (dict(policy=PolicyConfig(tau=float("nan"))), "policy.tau"),
        (dict(policy=PolicyConfig(tau=-1.0)), "policy.tau"),
        (dict(policy=PolicyConfig(lam_scale="mean")), "policy.lam_scale"),
        (
            dict(policy=PolicyConfig(on_miss="skip_lsb"), bits=BitsConfig(scheme="base")),
            "policy.on_miss",
        ),
        (dict(policy=PolicyConfig(on_miss="skip")), "policy.on_miss"),
        (dict(policy=PolicyConfig(on_miss="drop", drop_below=1.5)), "policy.drop_below"),
        (dict(policy=renamed_field()), "policy.lsb_miss"),
        (dict(eval=EvalConfig(max_new_tokens=0)), "eval.max_new_tokens"),
        (dict(eval=EvalConfig(num_fewshot=-1)), "eval.num_fewshot"),
        (dict(cache=CacheConfig(frac=0.0)), "cache.frac"),
        # Caught before a model load, not on the actor after one.
        (dict(bits=BitsConfig(group=7)), "bits.group"),
        (dict(eval=EvalConfig(task="gsm8k", data_path="/etc")), "eval.data_path"),
        (dict(eval=EvalConfig(task="wikitext", data_path="/etc")), "eval.data_path"),
        (dict(model=ModelConfig(name="qwen3-30b-a3b", dtype="bfloat16")), "model.path"),
        *((dict(batch_size=b), "batch_size") for b in (0, -3, 2.0, True, "big", None)),
    ],
)
def test_bad_configs_fail_fast_naming_the_field(change, field):
    with pytest.raises(ConfigError) as err:
        validate(replace(RunConfig(), **change))
    assert err.value.field == field


def test_a_cuda_device_is_refused_where_there_is_none(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="model.device: no CUDA device here"):
        validate(RunConfig(model=ModelConfig(device="cuda")))


def test_missing_model_path_names_model_path(tmp_path):

    with pytest.raises(ConfigError, match="model.path"):
        validate(RunConfig(model=ModelConfig(path=str(tmp_path / "none"))))


def test_drop_changes_perplexity_saves_flash_bytes_and_is_fetch_below_zero(loaded, tmp_path):
    """Against fetch, on one config with a quarter of the experts in DRAM and the model in the
    loop: drop, with a high threshold, leaves out missed experts, reads less from Flash and
    scores otherwise; with drop_below=0 it is fetch exactly. (substitute's bill: test_backends.)"""
    text = tmp_path / "wiki.txt"
    text.write_text(" = Valkyria = \n\n The game began development in 2010 . " * 40)
    wiki = EvalConfig(task="wikitext", data_path=str(text), limit=2, seq_len=32, stride=32)
    policies = {
        "fetch": PolicyConfig(),
        "drop": PolicyConfig(on_miss="drop", drop_below=0.3),
        "drop nothing": PolicyConfig(on_miss="drop", drop_below=0.0),
    }
    r = {name: run(cfg(eval=wiki, policy=policy), loaded) for name, policy in policies.items()}
    fetch, drop = r["fetch"], r["drop"]
    assert drop["dropped_fraction"] > 0.05 and fetch["dropped_fraction"] == 0
    assert drop["perplexity"] != fetch["perplexity"]
    assert drop["flash_bytes_decode"] < fetch["flash_bytes_decode"] / 2
    assert drop["energy_decode_j"] < fetch["energy_decode_j"]
    for m in METRICS:
        if m != "wall_s":
            assert r["drop nothing"][m] == pytest.approx(fetch[m], rel=0, nan_ok=True), m


def test_lambda_controller_pushes_the_miss_rate_toward_its_target(loaded):
    """cache_prior starting at lam=0 (= top-k): the controller raises lam on each device until
    its high-bit-normalised miss rate comes down toward the target."""
    base = small_cache(PolicyConfig(routing="cache_prior", precision="high", lam=0.0))
    free = run(base, loaded)
    target = free["miss_rate_hbn_steady"] / 4
    held = run(replace(base, policy=replace(base.policy, miss_rate_target=target)), loaded)
    assert held["miss_rate_hbn_steady"] < free["miss_rate_hbn_steady"] / 2


def test_running_logit_range_is_kept_per_device(loaded):
    """lam_scale=running keeps one running mean per device: batching changes nothing, and it
    routes differently from the per-token range."""
    pol = PolicyConfig(routing="cache_prior", precision="high", lam=0.3, lam_scale="running")
    one, three = (run(replace(small_cache(pol), batch_size=b), loaded) for b in (1, 3))
    for m in ("miss_rate", "accuracy", "energy_decode_j"):
        assert one[m] == pytest.approx(three[m], rel=1e-9), m
    token = run(small_cache(replace(pol, lam_scale="token")), loaded)
    assert token["miss_rate"] != one["miss_rate"]


def hostile(tmp_path, damage):
    """A copy of the tiny checkpoint, damaged."""
    import shutil

    from slicemoe.models import TINY_PATH

    root = tmp_path / "ckpt"
    shutil.copytree(TINY_PATH, root)
    damage(root)
    return str(root)


def _truncate(root):
    f = root / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _remote_code(root):
    c = json.loads((root / "config.json").read_text())
    c.update(model_type="my_moe", auto_map={"AutoModelForCausalLM": "modeling_my_moe.MyMoe"})
    (root / "config.json").write_text(json.dumps(c))


def _pickle_only(root):
    (root / "model.safetensors").rename(root / "pytorch_model.bin")


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncate, "model.safetensors is truncated: "),
        (lambda r: (r / "config.json").write_text("{not json"), "config.json is not valid JSON"),
        (lambda r: (r / "config.json").write_text("{}"), "config.json names no model_type"),
        (_remote_code, "needs trust_remote_code, which is never enabled"),
        (_pickle_only, "only pickle weights (pytorch_model.bin), which are never loaded"),
        (lambda r: (r / "tokenizer.json").unlink(), "has no tokenizer"),
        (lambda r: (r / "config.json").unlink(), "has no config.json"),
    ],
)
def test_a_hostile_checkpoint_fails_validation_in_one_line(tmp_path, damage, message):
    path = hostile(tmp_path, damage)
    with pytest.raises(ConfigError) as err:
        validate(RunConfig(model=ModelConfig(path=path)))
    assert err.value.field == "model.path" and message in str(err.value)
    assert "\n" not in str(err.value)
