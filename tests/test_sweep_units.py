"""Sweep engine pieces in-process: config composition, run keys, tracking, worker, scheduler,
progress. No Ray, no subprocesses."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import conftest_sweep as fake
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from slicemoe.config import CacheConfig, RunConfig
from sweep import app, jobs, schema
from sweep.errors import SweepError

# On one xdist worker, so that the tracking store is built once.
pytestmark = pytest.mark.xdist_group("test_sweep_units")

CONF = Path(app.CONF_DIR)


def compose_cfg(*overrides: str):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# --- config groups and schema ------------------------------------------------------------------


@pytest.mark.parametrize(
    "group", ["model", "bits", "cache", "policy", "hardware", "eval", "experiment"]
)
def test_every_group_option_composes_into_the_typed_schema(group):
    for option in options(group):
        override = f"+{group}={option}" if group == "experiment" else f"{group}={option}"
        cfg = compose_cfg(override)
        run_cfg = schema.run_config(OmegaConf.merge(cfg, {"model": {"path": "/m"}}))
        assert isinstance(run_cfg, RunConfig)
        if group in ("model", "bits", "cache", "policy", "hardware"):
            assert getattr(run_cfg, group).name == option, (group, option)


def test_group_values_match_the_issue():
    bits = {o: schema.run_config(compose_cfg(f"bits={o}")).bits for o in options("bits")}
    assert (bits["mat42"].high, bits["mat42"].low) == (4, 2)
    assert (bits["fp16"].high, bits["fp16"].low) == (None, None)
    assert (bits["int8"].high, bits["int8"].low) == (8, None)
    cache = schema.run_config(compose_cfg("cache=1.8gb")).cache
    assert (cache.bytes, cache.frac) == (1_800_000_000, None)
    cache = schema.run_config(compose_cfg("cache=frac_25")).cache
    assert (cache.bytes, cache.frac) == (None, 0.25)
    pol = schema.run_config(compose_cfg("policy=belady_oracle", "cache=frac_10"))
    assert (pol.policy.routing, pol.policy.precision, pol.cache.eviction) == (
        "topk",
        "high",
        "belady",
    )
    assert pol.cache.frac == 0.1
    assert schema.run_config(compose_cfg("policy=dbsc_pcw")).policy.warmup == "pcw"
    cp = schema.run_config(compose_cfg("policy=cache_prior_highbit")).policy
    assert (cp.routing, cp.precision, cp.lam) == ("cache_prior", "high", 0.2)
    default = schema.run_config(compose_cfg())
    assert default == replace(RunConfig(), model=default.model)
    assert default.model.path is None and default.eval.task == "arith"


def test_batch_size_takes_an_integer_or_auto_on_the_command_line():
    assert schema.run_config(compose_cfg()).batch_size == "auto"
    assert schema.run_config(compose_cfg("batch_size=16")).batch_size == 16
    assert schema.run_config(compose_cfg("batch_size=auto")).batch_size == "auto"


@pytest.mark.parametrize(
    "override, key",
    [
        ("bits.low=abc", "bits.low"),
        ("policy.tua=0.3", "policy.tua"),
        ("cache.frac=x", "cache.frac"),
    ],
)
def test_wrong_types_and_unknown_keys_fail_naming_the_key(override, key):
    with pytest.raises(Exception) as info:
        compose_cfg(override)
    text = str(info.value) + str(info.value.__cause__ or "")
    assert key in text


@pytest.mark.parametrize(
    "override, message",
    [
        ("+polcy.tau=0.3", "polcy: no such config field. Did you mean policy?"),
        ("+policy.taux=0.3", "policy.taux: no such config field. Did you mean policy.tau?"),
    ],
)
def test_keys_added_with_plus_must_exist_in_the_schema(override, message):
    with pytest.raises(SweepError, match=message.replace(".", r"\.").replace("?", r"\?")):
        schema.run_config(compose_cfg(override))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["policy.tua=0.3"], "policy.tua: no such config field. Did you mean policy.tau?"),
        (["+policy.tua=0.3"], "policy.tua: no such config field. Did you mean policy.tau?"),
        (["++polcy.tau=0.3"], "polcy: no such config field. Did you mean policy?"),
        (["polcy=dbsc"], "polcy: no such config field. Did you mean policy?"),
        (["batch_siz=2"], "batch_siz: no such config field. Did you mean batch_size?"),
        (["policy=dbcs"], "policy=dbcs: no such option of policy. Did you mean policy=dbsc?"),
        (["cache=frac25"], "cache=frac25: no such option of cache. Did you mean cache=frac_25"),
        (["+experiment=paper_al"], "experiment=paper_al: no such option of experiment. Did you"),
        (["-m", "policy=dbsc,dbcs"], "policy=dbcs: no such option of policy. Did you mean"),
        (["--multirun", "cache.frac=0.1,0.2", "eval.limt=3"], "eval.limt: no such config"),
    ],
)
def test_a_misspelt_key_or_option_names_the_nearest_before_hydra_composes(argv, message):
    with pytest.raises(SweepError) as err:
        app.check_command_line(argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value), str(err.value)


def test_valid_command_lines_pass_the_check_and_hydra_keeps_the_rest():
    for argv in (
        ["-m", "policy=dbsc,lru_highbit", "cache=frac_25,frac_50", "policy.tau=0.1,0.3"],
        ["-m", "seed=range(0,3)", "policy.lam=interval(0,1)", "policy.tau=${oc.env:TAU}"],
        ["+experiment=paper_fig8", "hydra/launcher=basic", "hydra.run.dir=out"],
        ["+ray.runtime_env.working_dir=.", "bits.low=null", "trace=yes", "policy=glob(*)"],
        ["model=mixtral-8x7b", "model.path=/m", "-cn", "config", "policy.tau=[1,"],
    ):
        app.check_command_line(argv)


@pytest.mark.parametrize("bits", options("bits"))
@pytest.mark.parametrize("policy", options("policy"))
def test_every_policy_preset_with_every_bits_option_validates_or_names_the_field(policy, bits):
    from slicemoe import run as runner

    cfg = compose_cfg(f"policy={policy}", f"bits={bits}")
    try:
        jobs.make_job(0, cfg, [f"policy={policy}", f"bits={bits}"], runner)
    except SweepError as err:
        # Only the low-bit and DBSC presets need Matryoshka bits, and they say so.
        assert "policy.precision" in str(err) and "bits.low" in str(err), str(err)
        run_cfg = schema.run_config(cfg)
        assert run_cfg.policy.precision in ("low", "dbsc") and run_cfg.bits.low is None


def test_a_big_model_without_path_fails_naming_model_path():
    with pytest.raises(SweepError, match="model.path"):
        schema.run_config(compose_cfg("model=qwen1.5-moe-a2.7b"))
    cfg = schema.run_config(compose_cfg("model=mixtral-8x7b", "model.path=/models/mixtral"))
    assert cfg.model.path == "/models/mixtral" and cfg.model.dtype == "bfloat16"


# --- jobs: keys, params, validation -------------------------------------------------------------


def test_run_key_ignores_only_volatile_fields():
    base = RunConfig()
    key = jobs.run_key(base)
    assert key == jobs.run_key(RunConfig())
    assert key == jobs.run_key(replace(base, trace_path="/tmp/x.parquet"))
    assert key == jobs.run_key(replace(base, model=replace(base.model, device="cuda:1")))
    assert key != jobs.run_key(replace(base, seed=1))
    assert key != jobs.run_key(replace(base, trace=True))
    assert key != jobs.run_key(replace(base, cache=replace(base.cache, frac=0.5)))


def test_a_config_field_added_later_keeps_the_keys_of_runs_stored_before_it():
    from slicemoe.config import PrefetchConfig

    # The keys these configs had before RunConfig.prefetch existed (when batch_size was 8 by
    # default; `auto` is another value, so another key).
    old = RunConfig(batch_size=8)
    assert jobs.run_key(old) == "c58c1b5020c40d558c2f"
    assert jobs.run_key(replace(old, cache=CacheConfig(frac=0.5))) == "8ac48023f69dd4e7d381"
    gate = PrefetchConfig(name="next_gate", predictor="next_gate")
    assert jobs.run_key(replace(old, prefetch=gate)) != jobs.run_key(old)
    # policy.lsb_miss=skip, renamed policy.on_miss=skip_lsb, keeps its key; drop is new.
    skip = replace(old, policy=replace(old.policy, on_miss="skip_lsb"))
    assert jobs.run_key(skip) == "dc8c79726af80ebf7c70"
    drop = replace(old, policy=replace(old.policy, on_miss="drop"))
    assert jobs.run_key(drop) not in (jobs.run_key(old), jobs.run_key(skip))
    # Every eviction policy's parameter is one of them, at a value written out in ADDED: a
    # parameter at another value is part of the key.
    from slicemoe.cache import EVICTION

    params = {f"cache.{n}" for policy in EVICTION.values() for n in policy.CONFIG.values()}
    assert params <= set(jobs.ADDED)
    lrfu = replace(old, cache=replace(old.cache, eviction="lrfu"))
    assert jobs.run_key(replace(lrfu, cache=replace(lrfu.cache, lrfu_lambda=0.5))) != jobs.run_key(
        lrfu
    )


def test_make_job_flattens_params_and_names_the_run(monkeypatch):
    cfg = compose_cfg("cache=frac_10", "policy=lru_highbit", "mlflow.experiment=x")
    job = jobs.make_job(
        3, cfg, ["cache=frac_10", "policy=lru_highbit", "mlflow.experiment=x"], fake
    )
    assert job.name == "cache=frac_10 policy=lru_highbit"
    assert job.params["cache.frac"] == "0.1" and job.params["trace_path"] == "null"
    assert job.params["policy.name"] == "lru_highbit" and len(job.params) >= 50
    assert job.load_key == "tiny/8/4" and job.index == 3
    assert "frac: 0.1" in job.config_yaml


def test_semantic_errors_name_the_field_before_any_work():
    cfg = compose_cfg("bits.low=8", "bits.high=4")
    with pytest.raises(SweepError, match=r"bits\.low: 8 must be below"):
        jobs.make_job(0, cfg, ["bits.low=8", "bits.high=4"], fake)


def test_the_sweep_logs_exactly_the_metrics_slicemoe_reports():
    from slicemoe.run import METRICS

    assert tuple(jobs.RESULT_METRICS) == tuple(METRICS)


def test_real_validate_is_used_through_the_sweep():
    from slicemoe import run as science

    cfg = compose_cfg("bits.low=8", "bits.high=4")
    with pytest.raises(SweepError, match=r"bits\.low"):
        jobs.make_job(0, cfg, [], science)


def test_objective_and_return_value():
    cfg = compose_cfg("sweep.objective=[accuracy,energy_decode_j]")
    assert jobs.objective_of(cfg) == ["accuracy", "energy_decode_j"]
    assert jobs.return_value({"accuracy": 0.5, "energy_decode_j": 2}, ["accuracy"]) == 0.5
    assert jobs.return_value({"accuracy": 0.5, "energy_decode_j": 2}, None) == {
        "accuracy": 0.5,
        "energy_decode_j": 2,
    }
    with pytest.raises(SweepError, match="sweep.objective"):
        jobs.objective_of(compose_cfg("sweep.objective=[acc]"))


def test_runner_without_the_api_is_refused():
    with pytest.raises(SweepError, match="sweep.runner=json"):
        jobs.load_runner("json")
    with pytest.raises(SweepError, match="cannot import"):
        jobs.load_runner("no_such_module_here")


# --- tracking and worker ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from sweep.tracking import Tracker

    # One store for the module, from the migrated copy (creating one takes seconds).
    return Tracker.open(fake.empty_store(tmp_path_factory.mktemp("store")), "units")


@pytest.fixture
def tracker(store, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    return store


def fake_job(index=0, **kw) -> jobs.Job:
    cfg = compose_cfg(*[f"{k}={v}" for k, v in kw.items()])
    return jobs.make_job(index, cfg, [f"{k}={v}" for k, v in kw.items()], fake)


def test_unreachable_tracking_server_fails_fast():
    from sweep.tracking import Tracker

    t0 = time.monotonic()
    with pytest.raises(SweepError, match=r"mlflow.tracking_uri=http://127.0.0.1:9 is unreachable"):
        Tracker.open("http://127.0.0.1:9", "x")
    assert time.monotonic() - t0 < 10
    with pytest.raises(SweepError, match="does not exist"):
        Tracker.open("sqlite:////no/such/dir/mlflow.db", "x")


def test_relative_sqlite_uri_is_made_absolute(tmp_path, monkeypatch):
    from sweep.tracking import resolve_uri

    monkeypatch.chdir(tmp_path)
    assert resolve_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert resolve_uri("sqlite:////abs/m.db") == "sqlite:////abs/m.db"
    assert resolve_uri("http://h:5000") == "http://h:5000"


def claimed(tracker, job, sweep_id="", driver=None):
    """The record of `job`, claimed by `driver` (this process by default)."""
    from sweep.drivers import Driver
    from sweep.tracking import new_record

    record = new_record(job, None, sweep_id, "abc", (driver or Driver.this_process()).tags())
    assert tracker.claim(record).run_id == record.run_id is not None
    return record


def test_worker_logs_metrics_curves_trace_and_config(tracker, tmp_path):
    from sweep import worker

    job = fake_job(trace="true", seed=1)
    record = claimed(tracker, job, "sid")
    out = worker.execute(fake, worker.ModelCache(1), job, record, tracker)
    assert out.status == "FINISHED" and set(out.metrics) == set(jobs.RESULT_METRICS)
    assert out.run_id == record.run_id and out.record is None
    run = tracker.client.get_run(out.run_id)
    assert run.info.status == "FINISHED"
    assert set(jobs.RESULT_METRICS) <= set(run.data.metrics)
    assert math.isnan(run.data.metrics["perplexity"])
    assert run.data.params["cache.frac"] == "0.25"
    tags = run.data.tags
    assert tags["run_key"] == job.key and tags["sweep_id"] == "sid" and tags["git_commit"] == "abc"
    assert tags["host"] and tags["device"] == "cpu" and tags["model_load"] == "fresh"
    history = tracker.client.get_metric_history(out.run_id, "miss_rate_running")
    assert [m.step for m in history] == list(range(5))
    artifacts = {a.path for a in tracker.client.list_artifacts(out.run_id)}
    assert artifacts == {"config.yaml", "trace.parquet", "problems.json"}
    # The stand-in's seed 1: problems 0, 2, 4, ... right.
    limit = job.config.eval.limit
    assert problems(tracker, out.run_id, tmp_path) == {
        "correct": [1 - i % 2 for i in range(limit)],
        "task": "arith",
        "limit": limit,
    }
    assert tracker.finished()[job.key].info.run_id == out.run_id


def test_a_stored_stream_that_changed_or_cannot_be_read_is_recorded_again(
    store, tmp_path, monkeypatch, capsys
):
    """Every stream is hashed when recorded; a stored one whose bytes changed is never replayed,
    one that cannot be read neither; both are recorded again, and every replayed run carries
    the hash of the stream it replayed."""
    from urllib.parse import urlparse

    import replay_runner

    from sweep import worker
    from sweep.tracking import STREAM_ARTIFACT, Tracker

    monkeypatch.setenv("FAKE_DIR", str(tmp_path))
    tracker = Tracker.open(store.uri, "streams")  # an experiment of its own: no other streams
    calls = tmp_path / "calls.log"

    def unit(*overrides):
        group = [
            jobs.make_job(i, compose_cfg(o, "seed=5"), [o, "seed=5"], replay_runner)
            for i, o in enumerate(overrides)
        ]
        records = [claimed(tracker, job) for job in group]
        outs = worker.execute_group(replay_runner, worker.ModelCache(1), group, records, tracker)
        assert [o.status for o in outs] == ["FINISHED"] * len(group)
        return [tracker.client.get_run(o.run_id).data.tags for o in outs]

    def recorded() -> int:
        return calls.read_text().count("record ")

    first = unit("cache=frac_10", "cache=frac_50")
    digest = first[0]["stream_sha256"]
    assert first[0]["stream_source"] == "recorded" and recorded() == 1
    assert all(t["stream_sha256"] == digest for t in first)
    (run,) = tracker.search("tags.stream_source = 'recorded'")
    stored = Path(urlparse(run.info.artifact_uri).path) / STREAM_ARTIFACT

    assert unit("cache=frac_15")[0]["stream_source"] == "stored" and recorded() == 1
    stored.write_bytes(stored.read_bytes()[:-1] + b"x")  # altered, still a file
    tags = unit("cache=frac_20")[0]
    assert tags["stream_source"] == "recorded" and recorded() == 2
    assert "changed since it was recorded" in capsys.readouterr().err
    assert tags["stream_sha256"] == digest  # recorded again: the same stream, byte for byte
    # A stream stored before streams were hashed, then truncated: it cannot be read.
    for run in tracker.search("tags.stream_source = 'recorded'"):
        tracker.client.delete_tag(run.info.run_id, "stream_sha256")
        path = Path(urlparse(run.info.artifact_uri).path) / STREAM_ARTIFACT
        path.write_bytes(path.read_bytes()[:100])
    assert unit("cache=frac_30")[0]["stream_source"] == "recorded" and recorded() == 3
    assert "cannot be read" in capsys.readouterr().err


def problems(tracker, run_id: str, folder: Path) -> dict:
    """A run's problems.json artifact."""
    import json

    path = tracker.client.download_artifacts(run_id, "problems.json", str(folder))
    return json.loads(Path(path).read_text())


def test_a_failing_run_is_recorded_with_its_error(tracker):
    from sweep import worker

    job = fake_job(seed=13)
    out = worker.execute(fake, worker.ModelCache(1), job, claimed(tracker, job), tracker)
    assert out.status == "FAILED" and "boom" in out.error
    run = tracker.client.get_run(out.run_id)
    assert run.info.status == "FAILED" and "RuntimeError: boom" in run.data.tags["error"]
    assert "error.txt" in {a.path for a in tracker.client.list_artifacts(out.run_id)}
    assert job.key not in tracker.finished()


def test_a_finished_key_is_its_result_unless_resume_is_off(tracker):
    from sweep import worker
    from sweep.drivers import Driver
    from sweep.tracking import new_record

    job = fake_job(seed=3)
    first = worker.execute(fake, worker.ModelCache(1), job, claimed(tracker, job), tracker)
    assert first.status == "FINISHED"
    tags = Driver.this_process().tags()
    again = new_record(job, None, "", "abc", tags)
    assert tracker.claim(again).finished.info.run_id == first.run_id and again.run_id is None
    # sweep.resume=false: computed again, in a run of its own; the finished one stays
    fresh = new_record(job, None, "", "abc", tags, resume=False)
    assert tracker.claim(fresh).run_id == fresh.run_id not in (None, first.run_id)
    assert tracker.key_state(job.key, resume=False).finished is None
    second = worker.execute(fake, worker.ModelCache(1), job, fresh, tracker)
    assert second.status == "FINISHED" and second.run_id == fresh.run_id
    statuses = [r.info.status for r in tracker.search(f"tags.run_key = '{job.key}'")]
    assert statuses == ["FINISHED", "FINISHED"]


def test_a_claim_keeps_live_drivers_apart_and_takes_over_from_dead_ones(tracker):
    import subprocess
    import sys

    from sweep.drivers import STALE_S, Driver, host_id, is_alive, process_mark

    me, other = Driver.this_process(), Driver.this_process()  # two drivers, both alive here
    job = fake_job(seed=2)
    first = claimed(tracker, job, driver=me)
    from sweep.tracking import new_record

    second = new_record(job, None, "", "abc", other.tags())
    state = tracker.claim(second)
    # The live claim stays, the second one is withdrawn (deleted) again.
    assert state.holder.info.run_id == first.run_id and second.run_id is None
    assert tracker.client.get_run(first.run_id).info.status == "RUNNING"
    assert [r.info.run_id for r in tracker.search(f"tags.run_key = '{job.key}'")] == [first.run_id]

    # A driver that has exited (same machine: its pid is gone) holds nothing: its run is KILLED.
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(gone.stdout)
    assert process_mark(dead_pid) is None
    tracker.client.set_tag(first.run_id, "driver_pid", str(dead_pid))
    assert not is_alive(tracker.client.get_run(first.run_id).data.tags)
    third = new_record(job, None, "", "abc", other.tags())
    assert tracker.claim(third).run_id == third.run_id
    assert tracker.client.get_run(first.run_id).info.status == "KILLED"

    # On another machine, a driver is alive while its heartbeat is fresh.
    remote = {"driver": "x", "driver_host": host_id() + "-elsewhere", "driver_pid": "1"}
    assert is_alive({**remote, "heartbeat": str(time.time() - 5)})
    assert not is_alive({**remote, "heartbeat": str(time.time() - STALE_S - 1)})
    assert not is_alive({"role": "run"})  # left by a version without claims

    # A driver taken for gone comes back (a suspended machine) and pushes its result: its claim
    # was closed meanwhile, so the result gets a claim of its own.
    third.metrics = [("accuracy", 1.0, 0, 0)]
    taken_over = third.run_id
    tracker.client.set_terminated(taken_over, "KILLED")
    made = tracker.push(third)
    assert made == third.run_id and made not in (taken_over, first.run_id, None)
    assert tracker.client.get_run(taken_over).info.status == "KILLED"
    assert tracker.client.get_run(made).info.status == "FINISHED"

    # A finished key is never claimed again, nor finished twice.
    fourth = new_record(job, None, "", "abc", me.tags())
    assert tracker.claim(fourth).finished.info.run_id == made and fourth.run_id is None
    late = new_record(job, None, "", "abc", me.tags())
    late.run_id = tracker.start(late)  # a claim closed meanwhile, while the key was finished
    tracker.client.set_terminated(late.run_id, "KILLED")
    assert tracker.push(late) == made
    finished = tracker.search(f"tags.run_key = '{job.key}' and attributes.status = 'FINISHED'")
    assert [r.info.run_id for r in finished] == [made]


def test_parents_are_reopened_and_never_doubled(tracker):
    from sweep.tracking import parent_record

    parent = tracker.open_parent("s1", "a sweep", "abc")
    tracker.push(parent_record(parent, "FINISHED", {"total": 1}, "run\n"))
    assert tracker.open_parent("s1", "a sweep", "abc") == parent
    assert tracker.client.get_run(parent).info.status == "RUNNING"
    assert tracker.open_parent("s2", "another", "abc") != parent
    # One another driver kept (role=sweep) is adopted, not doubled.
    rival = tracker.client.create_run(
        tracker.experiment_id, tags={"role": "sweep-candidate", "sweep_id": "s3"}
    ).info.run_id
    tracker.client.set_tag(rival, "role", "sweep")
    assert tracker.open_parent("s3", "third", "abc") == rival
    assert len(list(tracker.search("tags.sweep_id = 's3'"))) == 1


class AwayClient:
    """An MlflowClient whose store stops answering after `answers` writes."""

    def __init__(self, client, answers: int):
        self.client, self.answers = client, answers

    def __getattr__(self, name):
        call = getattr(self.client, name)
        if name not in ("log_batch", "log_artifact", "set_terminated", "create_run", "set_tag"):
            return call

        def maybe(*args, **kwargs):
            self.answers -= 1
            if self.answers < 0:
                from mlflow.exceptions import MlflowException

                raise MlflowException(
                    "API request failed: Max retries exceeded (connection refused)"
                )
            return call(*args, **kwargs)

        return maybe


def test_a_result_the_store_cannot_take_is_spooled_then_pushed_whole(tracker, tmp_path):
    from sweep import sync, worker
    from sweep.tracking import Tracker

    job = fake_job(trace="true", seed=5)
    record = claimed(tracker, job)
    away = Tracker(tracker.uri, tracker.experiment_id)
    away.client = AwayClient(tracker.client, answers=1)  # one artifact, then nothing
    out = worker.execute(fake, worker.ModelCache(1), job, record, away)
    assert out.status == "FINISHED" and out.record is not None and "Max retries" in out.store_error
    assert isinstance(out.record.artifacts["trace.parquet"], bytes)  # outlives the actor's files
    spool = sync.Spool(tmp_path / "spool")
    spool.put(out.record, tracker.uri, "units", out.store_error)
    assert tracker.client.get_run(record.run_id).info.status == "RUNNING"

    # Pushed by hand (python -m sweep.sync), into the run the claim made: nothing lost.
    assert sync.main([str(spool.folder), "--tracking-uri", tracker.uri]) == 0
    assert spool.entries() == [] and job.key in tracker.finished()
    run = tracker.client.get_run(record.run_id)
    assert run.info.status == "FINISHED" and set(jobs.RESULT_METRICS) <= set(run.data.metrics)
    assert run.data.tags["host"] and run.data.tags["model_load"] == "fresh"
    history = tracker.client.get_metric_history(record.run_id, "miss_rate_running")
    assert sorted(m.step for m in history) == list(range(5))
    names = {a.path for a in tracker.client.list_artifacts(record.run_id)}
    assert names == {"config.yaml", "trace.parquet", "problems.json"}
    assert problems(tracker, record.run_id, tmp_path)["correct"] == [
        1 - i % 2 for i in range(job.config.eval.limit)
    ]  # seed 5, as seed 1


def test_a_record_without_a_run_is_claimed_when_pushed_and_never_doubled(tracker, tmp_path):
    """Dispatched while the store was away: the push makes the run; a push that fails half-way
    keeps the run id it made, so the next push does not make a second one."""
    from sweep import sync
    from sweep.drivers import Driver
    from sweep.tracking import Tracker, new_record

    job = fake_job(seed=6)
    record = new_record(job, None, "", "abc", Driver.this_process().tags())
    record.metrics = [("accuracy", 0.5, 1, 0)]
    spool = sync.Spool(tmp_path / "spool")
    spool.put(record, tracker.uri, "units")
    away = Tracker(tracker.uri, tracker.experiment_id)
    away.client = AwayClient(tracker.client, answers=2)  # creates the run, then fails
    assert len(spool.push(spool.entries(), away)) == 1
    made = spool.entries()[0].record.run_id
    assert made is not None and "Max retries" in spool.entries()[0].error
    assert spool.push(spool.entries(), tracker) == []
    runs = list(tracker.search(f"tags.run_key = '{job.key}'"))
    assert [(r.info.run_id, r.info.status) for r in runs] == [(made, "FINISHED")]
    # A copy computed twice while the store was away is dropped: the stored run stays.
    again = new_record(job, None, "", "abc", Driver.this_process().tags())
    assert tracker.push(again) == made and again.run_id is None


def test_a_spool_that_cannot_be_written_fails_in_one_line_naming_it(tmp_path):
    from sweep import sync
    from sweep.tracking import RunRecord

    (tmp_path / "file").write_text("")
    spool = sync.Spool(tmp_path / "file" / "spool")
    with pytest.raises(SweepError) as err:
        spool.put(RunRecord("k", "cache=frac_10", "r1"), "sqlite:///x", "e")
    assert str(tmp_path / "file" / "spool") in str(err.value) and "\n" not in str(err.value)
    assert "[cache=frac_10] is lost" in str(err.value)


def test_a_malformed_spool_record_is_set_aside_and_the_others_are_read(tmp_path, capsys):
    from sweep import sync
    from sweep.tracking import RunRecord

    spool = sync.Spool(tmp_path / "spool")
    spool.put(RunRecord("k", "cache=frac_10", "r1"), "sqlite:///x", "e")
    bad = tmp_path / "spool" / "bad"
    bad.mkdir()
    (bad / "record.json").write_text('{"uri": "sqlite:///x", "record": {}}')  # no artifacts
    assert [e.record.name for e in spool.entries()] == ["cache=frac_10"]
    assert (tmp_path / "spool-malformed" / "bad" / "record.json").exists() and not bad.exists()
    assert "spool record" in capsys.readouterr().err
    assert sync.main([str(tmp_path / "nowhere")]) == 1
    assert "no such spool folder" in capsys.readouterr().err


def test_read_only_or_full_folders_stop_the_launch_naming_them(tmp_path, monkeypatch):
    import shutil

    cfg = compose_cfg(f"mlflow.tracking_uri=sqlite:///{tmp_path}/db/mlflow.db")
    (tmp_path / "file").write_text("")
    with pytest.raises(SweepError, match=f"output folder {tmp_path}/file/out cannot be written"):
        app.check_folders(cfg, str(tmp_path / "file" / "out"))
    app.check_folders(cfg, str(tmp_path / "out"))  # not there yet: its parent is writable
    full = shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    with pytest.raises(SweepError, match=r"only 1.0 MB free on"):
        app.check_folders(cfg, str(tmp_path / "out"))


def test_model_cache_loads_once_and_evicts_least_recent():
    from sweep.worker import ModelCache

    loads = []
    cache = ModelCache(2)
    for key in ["a", "a", "b", "a", "c", "a", "b"]:
        cache.get(key, lambda k=key: loads.append(k) or k)
    assert loads == ["a", "b", "c", "b"]


# --- scheduler ----------------------------------------------------------------------------------


def test_free_actor_keeps_its_model_then_takes_the_least_served_key():
    from sweep.actors import pick_key

    queues = {k: deque(range(n)) for k, n in {"a": 3, "b": 4, "c": 1}.items()}
    assert pick_key(["c", "a"], queues, {}) == "a"  # the most recent key it holds
    assert pick_key(["x"], queues, {}) == "b"  # nothing held: the largest queue
    assert pick_key([], queues, {"b": 3}) == "a"  # b already has three actors on it


def test_actor_plan_whole_gpus_by_default_cpu_fallback():
    from sweep.cluster import plan
    from sweep.schema import RayConf

    gpu_box = {"CPU": 16.0, "GPU": 4.0}
    p = plan(RayConf(), 100, gpu_box)
    assert (p.actors, p.num_gpus, p.num_cpus) == (4, 1.0, 1.0)
    p = plan(RayConf(num_gpus_per_actor=2), 100, gpu_box)
    assert (p.actors, p.num_gpus) == (2, 2.0)
    p = plan(RayConf(), 3, {"CPU": 8.0})
    assert (p.actors, p.num_gpus) == (3, 0.0)  # no GPU: CPU actors, at most one per run
    p = plan(RayConf(num_cpus_per_actor=4), 100, {"CPU": 8.0})
    assert p.actors == 2
    assert plan(RayConf(num_actors=5), 100, {"CPU": 2.0}).actors == 5
    # Replays as tasks where the actors hold GPUs, on the CPUs they leave; never with none left.
    assert plan(RayConf(), 100, gpu_box).replay_tasks
    assert not plan(RayConf(), 100, {"CPU": 8.0}).replay_tasks
    p = plan(RayConf(replay_tasks=True), 100, {"CPU": 8.0})
    assert (p.actors, p.replay_tasks) == (7, True)
    assert not plan(RayConf(replay_tasks=True), 100, {"CPU": 1.0}).replay_tasks
    assert not plan(RayConf(replay_tasks=False), 100, gpu_box).replay_tasks
    with pytest.raises(SweepError, match="ray.num_gpus_per_actor=1"):
        plan(RayConf(num_gpus_per_actor=1), 10, {"CPU": 8.0})


# --- progress and table -------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_lines_when_not_a_tty():
    from sweep.progress import Progress

    stream = io.StringIO()
    prog = Progress(total=10, skipped=2, stream=stream)
    prog.update(running=2, finished=0, failed=0)
    prog.update(running=2, finished=0, failed=0)  # nothing changed: no new line
    prog.update(running=1, finished=3, failed=1)
    prog.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[sweep] 2/10 done | 2 running | 0 failed | 2 skipped | ETA ?"
    assert lines[1].startswith("[sweep] 6/10 done | 1 running | 1 failed | 2 skipped | ETA ")
    assert len(lines) == 2


def test_progress_redraws_one_line_on_a_terminal():
    from sweep.progress import Progress

    stream = Terminal()
    prog = Progress(total=3, skipped=0, stream=stream)
    prog.update(running=2, finished=1, failed=0)
    prog.close()
    text = stream.getvalue()
    assert text.startswith("\r\033[K[sweep] 1/3 done | 2 running") and text.endswith("\n")
    assert text.count("\n") == 1


def test_a_run_bar_in_a_log_is_a_line_at_its_start_and_its_end():
    from sweep.progress import RunBar

    stream = io.StringIO()
    bar = RunBar("[run] cache=frac_10", stream, quiet_s=3600)
    for done, tokens in ((0, 0), (1, 40), (3, 100), (4, 160)):
        bar(done, 4, tokens)
    bar.close()  # ended already: no second last line
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("[run] cache=frac_10:   0%|") and " 0/4 [" in lines[0]
    assert lines[1].startswith("[run] cache=frac_10: 100%|") and " 4/4 [" in lines[1]
    assert re.search(r"seq/s, [\d.]+[kMG]? tok/s\]$", lines[1]), lines[1]


def test_a_run_bar_on_a_terminal_is_redrawn_in_place():
    from sweep.progress import RunBar

    stream = Terminal()
    bar = RunBar("[run]", stream)
    bar(0, 8, 0)
    bar.bar.mininterval = 0  # every call drawn
    bar(2, 8, 50)
    bar(8, 8, 200)
    drawn = len(stream.getvalue())
    bar(8, 8, 200)  # ended (its replays run): not drawn again with a falling rate
    assert len(stream.getvalue()) == drawn
    bar.close()
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, kept at the end
    frames = [f for f in text.rstrip("\n").split("\r") if f]
    assert [re.search(r" (\d)/8 ", f).group(1) for f in frames[:3]] == ["0", "2", "8"]
    assert "tok/s" in frames[-1]


def test_the_sweep_eta_counts_the_passes_in_flight_by_their_share_done(monkeypatch):
    from sweep import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    stream = io.StringIO()
    prog = progress.Progress(total=5, skipped=1, stream=stream, names={0: "a=1", 3: "a=2"})
    now[0] = 160.0
    prog.update(running=4, finished=0, failed=0)
    assert prog.eta() == "?"  # nothing done, nothing told
    # A pass for 2 runs at 3/4 of its sequences and one for 1 run at 1/2: 2 runs' worth in 60 s,
    # 2 to go.
    prog.update(running=3, finished=0, failed=0, passes={0: (2, 6, 8, 90), 3: (1, 1, 2, 9)})
    assert prog.eta() == "1m00s"
    prog.update(running=1, finished=2, failed=0, passes={3: (1, 1, 2, 9)})  # a=1's pass is done
    assert prog.eta() == "36s"  # 2.5 runs' worth in 60 s, 1.5 to go
    prog.close()
    # A bar per pass, under its first job's short name; in a log its last line where it left.
    lines = stream.getvalue().splitlines()
    last = {line.split(":")[0]: line for line in lines if line.startswith("[run]")}
    assert set(last) == {"[run] a=1 +1 replayed", "[run] a=2"}
    assert " 6/8 [" in last["[run] a=1 +1 replayed"] and " 1/2 [" in last["[run] a=2"]


def test_an_actor_keeps_the_progress_of_its_passes_in_flight():
    from sweep.actors import RunActor
    from sweep.progress import teller

    actor = RunActor.__new__(RunActor)  # no runner or store: only its progress is read here
    actor.progress = {}
    tell = teller(actor.progress, key=4, runs=2)
    tell(2, 8, 20)
    teller(actor.progress, key=9, runs=1)(1, 2, 3)
    assert actor.passes([4]) == {4: (2, 2, 8, 20)}
    tell(8, 8, 80)
    assert actor.passes([4, 9]) == {4: (2, 8, 8, 80)}  # 9 was dropped: not in flight at a read


def test_sweep_help_opens_with_what_the_sweep_does():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        help = compose("config", return_hydra_config=True).hydra.help
    header = help.header.replace("${hydra.help.app_name}", help.app_name)
    assert header.startswith("python -m sweep: simulate a mixture-of-experts LLM")
    assert "powered by Hydra" not in header and "with -m" in header


def test_duration_and_table_format():
    from sweep.progress import format_duration, result_table

    assert [format_duration(s) for s in (5, 75, 3725)] == ["5s", "1m15s", "1h02m"]
    table = result_table([("a=1", "FINISHED", {"accuracy": 0.5, "perplexity": math.nan})])
    header, row = table.splitlines()
    assert header.split() == ["run", "status", "accuracy"]  # no run has a perplexity
    assert row.split() == ["a=1", "FINISHED", "0.5"]
    # Several runs: each name keeps the overrides that differ; a metric one run has stays.
    rows = [
        ("cache=frac_10 policy=dbsc eval.limit=3", "FINISHED", {"accuracy": 0.5}),
        ("cache=frac_25 policy=dbsc eval.limit=3", "FAILED", {"perplexity": 7.0}),
    ]
    header, *body = result_table(rows).splitlines()
    assert header.split() == ["run", "status", "accuracy", "perplexity"]
    assert [line.split()[:3] for line in body] == [
        ["cache=frac_10", "FINISHED", "0.5"], ["cache=frac_25", "FAILED", "-"]
    ]  # fmt: skip
    # Units in the header, where a metric has one.
    units = {"flash_bytes_per_token": 1e5, "energy_decode_j_per_token": 1e-4, "wall_s": 3.0}
    header = result_table([("a=1", "FINISHED", units | {"accuracy": 0.5})]).splitlines()[0]
    assert re.split(r"\s{2,}", header) == [
        "run", "status", "accuracy", "flash_bytes_per_token [B]", "energy [J/token]", "wall [s]"
    ]  # fmt: skip


def test_a_store_away_at_the_end_stops_naming_the_spooled_runs_and_a_relaunch_skips_them(
    tracker, tmp_path, monkeypatch
):
    """A result the store did not take before the end: the launch stops naming the run and how
    to push it; a relaunch counts it done (never computed again) while the store is still away,
    and pushes it once the store answers."""
    from mlflow.exceptions import MlflowException

    from sweep.ledger import Ledger
    from sweep.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    cfg = compose_cfg(
        f"mlflow.tracking_uri={tracker.uri}", "mlflow.experiment=units", "mlflow.outage_wait_s=0"
    )
    job = fake_job(seed=8)
    ledger = Ledger(cfg)
    record = ledger.claim(job)
    record.metrics = [("accuracy", 0.75, 1, 0)]
    real_push = Tracker.push

    def away(self, record):
        raise MlflowException("API request failed: Max retries exceeded (connection refused)")

    monkeypatch.setattr(Tracker, "push", away)
    ledger.received(jobs.Outcome("FINISHED", {"accuracy": 0.75}, record=record, store_error="x"))
    with pytest.raises(SweepError) as err:
        ledger.drain()
    message = str(err.value)
    assert "did not take 1 runs" in message and f"[{job.name}] (run key {job.key})" in message
    assert f"python -m sweep.sync {tmp_path / 'mlflow-spool'}" in message

    relaunch = Ledger(cfg)  # the store still away
    assert relaunch.done()[job.key].metrics == {"accuracy": 0.75}
    monkeypatch.setattr(Tracker, "push", real_push)
    assert Ledger(cfg).done()[job.key].run_id == record.run_id  # pushed, now from the store
    assert not list((tmp_path / "mlflow-spool").glob("*/record.json"))


def test_a_private_ray_instance_that_starts_too_slowly_is_started_again(capsys):
    """Ray gives a starting node 30 s; on a busy box a private instance is tried again, while
    any other error (or a third timeout) is raised as it is."""
    from sweep import cluster

    class SlowRay:
        def __init__(self, failures: list[str]):
            self.failures, self.inits, self.shutdowns = failures, 0, 0

        def init(self, **kwargs):
            self.inits += 1
            if self.failures:
                raise Exception(self.failures.pop(0))

        def shutdown(self):
            self.shutdowns += 1

    slow = "The current node timed out during startup. This could happen because ..."
    ray = SlowRay([slow, slow])
    cluster._init(ray, {}, tries=3)
    assert (ray.inits, ray.shutdowns) == (3, 2)
    assert "did not start in time; trying again (3 of 3)" in capsys.readouterr().err
    with pytest.raises(Exception, match="timed out"):
        cluster._init(SlowRay([slow, slow, slow]), {}, tries=3)
    other = SlowRay(["GCS refused"])
    with pytest.raises(Exception, match="GCS refused"):
        cluster._init(other, {}, tries=3)
    assert other.inits == 1
    with pytest.raises(Exception, match="timed out"):
        cluster._init(SlowRay([slow]), {}, tries=1)  # a cluster address: no second try


def test_the_plan_counts_passes_replays_and_estimates_from_earlier_runs(tmp_path):
    """Cache-independent jobs share a pass; a cache-aware job's pass feeds its hardware
    variants only; a trace is imported, not a pass; the estimate uses the timings of earlier
    runs of that model, task and size."""
    from test_traces import write

    import slicemoe.run as runner
    from sweep.cluster import Plan
    from sweep.launcher import plan_text, timing_key

    grid = [
        f"policy={p} hardware={h} cache={c}"
        for p in ("dbsc", "cache_prior_highbit")
        for h in ("mobile_lpddr4_ufs31", "laptop_lpddr5_nvme")
        for c in ("frac_10", "frac_25")
    ]
    made = [
        jobs.make_job(i, compose_cfg(*o.split()), o.split(), runner) for i, o in enumerate(grid)
    ]
    units = jobs.units_of(made)
    assert sorted(map(len, units)) == [2, 2, 4]
    gpu = Plan(actors=1, num_cpus=1, num_gpus=1, replay_tasks=True, free_cpus=4)
    text = plan_text(units, gpu, {})
    assert text.startswith("plan: 3 model passes recording 3 streams feeding 8 replays (as CPU")
    assert "estimate: none yet" in text
    c = made[0].config
    # Three passes of 60 s on one GPU; eight replays of 10 s on four CPUs beside it.
    timings = {timing_key(c.model.name, c.eval.task, c.eval.limit): (60.0, 10.0)}
    text = plan_text(units, gpu, timings)
    assert "estimate: 3 min 0 s for the 3 units" in text
    cpu = Plan(actors=2, num_cpus=1, num_gpus=0)
    text = plan_text(units, cpu, timings)
    assert "in the actors" in text and "estimate: 2 min 10 s" in text
    # Packed (sweep.pack_rows): passes of one model, task, seed and batch share a pass while
    # their problems fit the rows, each stream's jobs kept together.
    limit = c.eval.limit
    packed = jobs.units_of(made, pack_rows=3 * limit)
    assert [len(u) for u in packed] == [8]
    assert [j.stream_key for j in packed[0]] == [j.stream_key for u in units for j in u]
    text = plan_text(packed, gpu, timings)
    assert text.startswith("plan: 1 model passes recording 3 streams (1 passes packed with 3")
    assert "estimate: 1 min 0 s for the 1 units" in text
    assert sorted(map(len, jobs.units_of(made, pack_rows=2 * limit))) == [2, 6]
    assert jobs.units_of(made, pack_rows=2 * limit - 1) == units
    other_seed = jobs.make_job(9, compose_cfg(*grid[0].split(), "seed=5"), grid[0].split(), runner)
    assert len(jobs.units_of([made[0], other_seed], pack_rows=3 * limit)) == 2
    trace = [f"stream_file={write(tmp_path / 't.npz', 'mixtral-8x7b')}", "model=mixtral-8x7b"]
    imported = jobs.make_job(10, compose_cfg(*trace), trace, runner)
    text = plan_text([*units, [imported]], gpu, {})
    assert text.startswith("plan: 3 model passes recording 3 streams and 1 traces imported feed")


def test_a_replayed_runs_optimality_joins_its_result_and_its_failure_only_a_tag():
    import pandas as pd

    from sweep import worker
    from sweep.tracking import RunRecord

    def analyse(stream, cfg, shared):
        shared["calls"] = shared.get("calls", 0) + 1
        return {"belady_gap": 0.25}, {"optimality_layers": pd.DataFrame({"layer": [0, 1]})}

    record, result, shared = RunRecord("k", "run"), {"miss_rate": 0.5}, {}
    worker._optimality(analyse, None, None, result, record, shared)
    assert result == {"miss_rate": 0.5, "belady_gap": 0.25} and shared == {"calls": 1}
    assert record.artifacts == {"optimality_layers.csv": b"layer\n0\n1\n"}

    def broken(stream, cfg, shared):
        raise RuntimeError("no oracle today")

    record, result = RunRecord("k", "run"), {"miss_rate": 0.5}
    worker._optimality(broken, None, None, result, record, {})
    assert result == {"miss_rate": 0.5} and not record.artifacts
    assert record.tags["optimality_error"] == "RuntimeError: no oracle today"


@pytest.mark.parametrize("model", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_a_sweep_replays_every_job_from_a_trace_and_the_report_draws_from_it(
    store, tmp_path, model
):
    """Jobs at a real model's shape (Mixtral's 8 experts, top-2; Qwen3's 128, top-8) from a
    router trace (slicemoe.traces) through the worker: one imported stream per precision, no
    model loaded, each run tagged with the trace's hash, and the report's figures from the
    runs."""
    from test_traces import write

    import slicemoe.run
    from slicemoe.traces import file_sha256
    from sweep import worker
    from sweep.report.__main__ import main as report
    from sweep.tracking import Tracker

    trace = write(tmp_path / f"{model}.npz", model, seqs=3, steps=16)
    tracker = Tracker.open(store.uri, f"traces {model}")  # an experiment of its own
    base = [f"model={model}", f"stream_file={trace}"]
    grid = [
        [c, p]
        for p in ("policy=dbsc", "policy=lru_lowbit")
        for c in ("cache=frac_10", "cache=frac_25")
    ]
    todo = [jobs.make_job(i, compose_cfg(*base, *o), o, slicemoe.run) for i, o in enumerate(grid)]
    units = jobs.units_of(todo)
    assert [len(u) for u in units] == [2, 2]  # one imported stream per precision
    models = worker.ModelCache(1)
    for unit in units:
        records = [claimed(tracker, job) for job in unit]
        outs = worker.execute_group(
            slicemoe.run, models, unit, records, tracker, mrc_points=3, optimality=False
        )
        assert [o.status for o in outs] == ["FINISHED"] * 2, [o.error for o in outs]
        assert models._items[unit[0].load_key] is None  # no model was loaded
    runs = list(tracker.search("tags.role = 'run'"))
    assert len(runs) == 4 and {r.data.params["model.name"] for r in runs} == {model}
    assert {r.data.tags["stream_file_sha256"] for r in runs} == {file_sha256(trace)}
    assert {r.data.params["stream_file"] for r in runs} == {str(trace)}
    out = tmp_path / "report"
    report(["--experiment", f"traces {model}", "--tracking-uri", store.uri, "--out", str(out)])
    assert {"accuracy_vs_miss_rate.png", "miss_ratio_curves.png"} <= {p.name for p in out.iterdir()}


def test_an_actor_starts_without_torch_or_transformers_until_its_runner_needs_them():
    """A sweep's actor imports the engine (Ray, MLflow) and the runner; the model's stack comes
    with a runner that uses it (slicemoe.run), not with the engine, so an actor of the stand-in
    runner starts in seconds."""
    code = (
        "import sys, sweep.actors, sweep.worker, conftest_sweep; "
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    env = fake.sweep_env(PYTHONPATH=f"{fake.REPO}:{fake.REPO / 'tests'}")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
