"""Malformed values, however given, stop a launch before any work: a non-zero exit, no
traceback, the field named, and the tracking store as it was (no run left RUNNING, nothing
finished touched).

Each case runs `python -m sweep` in this process (`sweep.__main__.main` with its argv), half of
them as single runs and half as multiruns (`-m`), against a store that already holds a finished
run.
"""

from __future__ import annotations

import copy
import math
import sys
from operator import attrgetter
from pathlib import Path

import pytest
from conftest_sweep import RUNNER, empty_store, launch, search
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from slicemoe.config import RunConfig
from slicemoe.validate import BOUNDS, ConfigError, validate
from sweep import app, schema
from sweep.__main__ import main
from sweep.errors import SweepError
from sweep.schema import SETTING_BOUNDS

# On one xdist worker, so that the store with a finished run is built once.
pytestmark = pytest.mark.xdist_group("test_hostile_input")

EXP = "hostile"
MINI_GSM8K = Path(__file__).parent / "data" / "gsm8k_mini"
# Every bounded number of the schema is also refused NaN, infinite and out of range by
# test_every_bounded_number_refuses_nan_inf_and_out_of_range, without a launch.
CASES = [
    # numbers: NaN, infinite, negative, out of range
    ("policy.tau=nan", "policy.tau"),
    ("policy.lam=-0.2", "policy.lam"),
    ("policy.cumsum_p=1.5", "policy.cumsum_p"),
    ("policy=max_rank policy.max_rank_keep=9", "policy.max_rank_keep"),
    ("policy=cache_prior_highbit policy.miss_rate_target=1.5", "policy.miss_rate_target"),
    ("cache.frac=0", "cache.frac"),
    ("cache.frac=inf", "cache.frac"),
    ("cache.frac=null cache.bytes=-5", "cache.bytes"),
    ("bits.group=7", "bits.group"),
    ("bits.high=9", "bits.high"),
    ("bits.low=8", "bits.low"),
    ("bits=mat84 bits.low=0", "bits.low: low bits 0 must be at least 1; use 1..7"),
    ("seed=-1", "seed: -1 is out of range; use a finite number in [0, 4294967295]"),
    ("hardware.dram_gbps=0", "hardware.dram_gbps"),
    ("hardware.flash_pj_per_bit=nan", "hardware.flash_pj_per_bit"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens"),
    ("eval.num_fewshot=-1", "eval.num_fewshot"),
    ("eval.stride=300", "eval.stride"),
    ("batch_size=0", "batch_size"),
    ("prefetch.top_m=-2", "prefetch.top_m"),
    # names that are not options
    ("policy.routing=psychic", "policy.routing"),
    ("cache.eviction=mru", "cache.eviction"),
    ("model.device=tpu", "model.device"),
    ("model.dtype=int8", "model.dtype"),
    ("model.backend=gpu", "model.backend"),
    ("policy=nope", "policy=nope: no such option of policy"),
    # files and folders
    ("model.path=/etc", "model.path"),
    ("model=qwen3-30b-a3b", "model.path"),
    ("eval=gsm8k eval.data_path=/etc", "eval.data_path"),
    ("trace=true trace_path=/nonexistent/dir/trace.parquet", "trace_path"),
    # wrong types, and a field deleted
    ("bits.low=abc", "bits.low=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("policy.tau=[1,2]", "policy.tau=[1,2]: Value '[1, 2]' of type 'list' could not be"),
    ("seed=1,2.5", "seed=1,2.5: Value '2.5' of type 'float' could not be converted to Integer"),
    # unknown keys, however added
    ("policy.tua=0.3", "policy.tua"),
    ("+polcy.tau=0.3", "polcy"),
    ("++polcy.tau=0.3", "polcy"),
    ("+ray.num_actor=2", "ray.num_actor"),
    ("~policy.tau", "~policy.tau: policy.tau is a config field and cannot be deleted"),
    # launch settings
    ("ray.num_actors=0", "ray.num_actors"),
    ("ray.num_gpus_per_actor=nan", "ray.num_gpus_per_actor"),
    ("ray.object_store_mb=1", "ray.object_store_mb"),
    ("ray.address=bogus", "ray.address"),
    ("mlflow.experiment=''", "mlflow.experiment"),
    ("mlflow.outage_wait_s=-1", "mlflow.outage_wait_s"),
    ("sweep.miss_ratio_points=-1", "sweep.miss_ratio_points"),
    ("sweep.objective=[nope]", "sweep.objective"),
]


def snapshot(uri: str) -> dict:
    return {
        r.info.run_id: (r.info.status, r.info.end_time, len(r.data.metrics), len(r.data.tags))
        for r in search(uri, EXP)
    }


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store with one finished run (the stand-in runner), as a user's would be. Every test
    that uses it is marked slow, as the launches are: run one after the other (the slow tests
    come first), they build it once."""
    folder = tmp_path_factory.mktemp("hostile")
    uri = empty_store(folder)
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    mp.setenv("FAKE_DIR", str(folder))
    mp.delenv("HYDRA_FULL_ERROR", raising=False)
    args = [f"sweep.runner={RUNNER}", f"mlflow.tracking_uri={uri}", f"mlflow.experiment={EXP}"]
    argv = sys.argv
    sys.argv = ["sweep", *args]
    try:
        main()
    finally:
        sys.argv = argv
    assert [r.info.status for r in search(uri, EXP)] == ["FINISHED"]
    yield folder, uri
    mp.undo()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_a_malformed_value_stops_the_launch_naming_the_field(index, store, capfd):
    folder, uri = store
    overrides, field = CASES[index]
    before = snapshot(uri)
    mode = ["-m"] if index % 2 else []
    # The case comes last: Hydra lets the last value of a key win.
    settings = [f"mlflow.tracking_uri={uri}", f"mlflow.experiment={EXP}"]
    code, out = launch([*mode, *settings, *overrides.split()], capfd)
    assert code not in (0, None), out
    assert "Traceback" not in out, out
    assert field in out, out
    assert code == 1 and "HYDRA_FULL_ERROR" not in out and "executing job" not in out, out
    assert snapshot(uri) == before  # nothing RUNNING, nothing finished touched


# Each with the reason OmegaConf gives.
INTERPOLATIONS = [
    ("policy.tau=${oc.env:HOME}", "Value '{home}' of type 'str' could not be converted to Float"),
    ("policy.tau=${nonexistent.key}", "Interpolation key 'nonexistent.key' not found"),
    ("sweep.name=${oc.env:NOPE_NOT_SET}", "Environment variable 'NOPE_NOT_SET' not found"),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [[], ["-m"]], ids=["run", "multirun"])
@pytest.mark.parametrize("override, why", INTERPOLATIONS, ids=[c[0] for c in INTERPOLATIONS])
def test_an_interpolation_that_cannot_be_resolved_is_one_line_naming_the_override(
    override, why, mode, store, capfd, monkeypatch
):
    folder, uri = store
    monkeypatch.setenv("HOME", "/home/nobody")
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    before = snapshot(uri)
    settings = [f"mlflow.tracking_uri={uri}", f"mlflow.experiment={EXP}"]
    code, out = launch([*mode, *settings, override], capfd)
    assert code == 1
    assert out.splitlines() == [
        f"Invalid override {override}: its interpolation cannot be resolved "
        f"({why.format(home='/home/nobody')}); fix it or give a plain value"
    ]
    assert snapshot(uri) == before
    assert not (folder / "mlflow-spool").exists()


def bad_values(low: float, high: float, open_low: bool) -> list[float]:
    values = [math.nan, math.inf, low if open_low else low - 1]
    return values + ([high + 1] if math.isfinite(high) else [])


@pytest.mark.parametrize("name, low, high, open_low", BOUNDS)
def test_every_bounded_number_refuses_nan_inf_and_out_of_range(name, low, high, open_low):
    section, _, attr = name.rpartition(".")
    for value in bad_values(low, high, open_low):
        cfg = copy.deepcopy(RunConfig())
        setattr(attrgetter(section)(cfg) if section else cfg, attr, value)
        with pytest.raises(ConfigError) as err:
            validate(cfg, weights=False)
        assert err.value.field == name, (name, value, str(err.value))


@pytest.fixture(scope="module")
def composed():
    with initialize_config_dir(app.CONF_DIR, version_base="1.3"):
        return compose("config")


@pytest.mark.parametrize("name, low, high, open_low", SETTING_BOUNDS)
def test_every_bounded_setting_refuses_nan_inf_and_out_of_range(
    name, low, high, open_low, composed
):
    for value in bad_values(low, high, open_low):
        cfg = copy.deepcopy(composed)
        try:
            OmegaConf.update(cfg, name, value)
        except ValidationError as err:  # an integer field: refused by its type already
            assert err.full_key == name
            continue
        with pytest.raises(SweepError, match=f"Invalid setting {name}: "):
            schema.check_settings(cfg)


@pytest.mark.parametrize("task, needs", [("gsm8k", "train.jsonl"), ("wikitext", "text file")])
def test_a_task_reading_local_data_refuses_an_unset_data_path_at_launch(task, needs):
    # `datasets` is installed here: the hub would be tried (and the run fail) after a launch.
    cfg = copy.deepcopy(RunConfig())
    cfg.eval.task, cfg.eval.data_path = task, None
    with pytest.raises(ConfigError, match=f"not set: set eval.data_path to .*{needs}") as err:
        validate(cfg, weights=False)
    assert err.value.field == "eval.data_path"


@pytest.mark.parametrize(
    "split, line, why",
    [
        ("test.jsonl", '{"question": "q", "answer": ', "not JSON (Expecting value)"),
        ("train.jsonl", '["q", "#### 1"]', "expected an object with question and answer"),
    ],
)
def test_a_malformed_gsm8k_line_stops_the_launch_naming_file_and_line(split, line, why, tmp_path):
    for name in ("train.jsonl", "test.jsonl"):
        lines = (MINI_GSM8K / name).read_text().splitlines()
        if name == split:
            lines[2] = line
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    cfg = copy.deepcopy(RunConfig())
    cfg.eval.task, cfg.eval.data_path = "gsm8k", str(tmp_path)
    with pytest.raises(ConfigError) as err:
        validate(cfg, weights=False)
    assert str(err.value) == f"eval.data_path: {tmp_path / split}:3: {why}; fix or delete that line"


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "overwritten"])
def test_a_damaged_tracking_database_stops_the_launch_naming_it_and_the_way_out(
    damage, store, tmp_path, capfd
):
    folder, uri = store
    db = tmp_path / "mlflow.db"
    whole = (folder / "mlflow.db").read_bytes()
    db.write_bytes(whole[: len(whole) // 10] if damage == "truncated" else b"\x5a" * 4096)
    damaged = db.read_bytes()
    code, out = launch([f"mlflow.tracking_uri=sqlite:///{db}", f"mlflow.experiment={EXP}"], capfd)
    why = "malformed" if damage == "truncated" else "not a database"
    assert code == 1
    assert out.splitlines() == [
        f"mlflow.tracking_uri=sqlite:///{db}: {db} is damaged ({why}); move it aside (mv {db} "
        f"{db}.damaged) and launch again: a fresh store is made, the results waiting in the "
        "spool are pushed to it and the runs kept only in the old file are computed again "
        f"(sqlite3 {db}.damaged .recover may salvage them)"
    ]
    assert db.read_bytes() == damaged


@pytest.mark.slow
def test_the_audit_lists_replayed_runs_whose_stream_is_gone_or_changed(store, tmp_path, capsys):
    """Runs tagged as sweep.worker tags them: the recording run of a stream keeps requests.npz
    and replayed it too, another run replayed it. Then one stream changes, one loses its file,
    and one run was replayed from a stream whose recording run is gone."""
    from urllib.parse import urlparse

    from sweep import audit
    from sweep.tracking import STREAM_ARTIFACT, Tracker, sha256_of

    tracker = Tracker.open(store[1], "audit")
    ids, stored = {}, {}

    def run(name: str, key: str, records: bool) -> None:
        path = tmp_path / name / STREAM_ARTIFACT
        path.parent.mkdir()
        path.write_bytes(key.encode() * 100)
        tags = {"role": "run", "replayed_from": key, "stream_sha256": sha256_of(path)}
        tags |= {"stream_key": key} if records else {}
        ids[name] = tracker.client.create_run(
            tracker.experiment_id, tags=tags, run_name=name
        ).info.run_id
        if records:
            tracker.client.log_artifact(ids[name], str(path))
            uri = tracker.client.get_run(ids[name]).info.artifact_uri
            stored[key] = Path(urlparse(uri).path) / STREAM_ARTIFACT
        tracker.client.set_terminated(ids[name])

    for key in ("s1", "s2", "s3"):
        run(f"{key}-rec", key, records=True)
        run(f"{key}-replay", key, records=False)
    argv = ["--tracking-uri", tracker.uri, "--experiment", "audit"]
    where = f"experiment 'audit' in {tracker.uri}"
    assert audit.main(argv) == 0
    assert capsys.readouterr().out == (
        f"{where}: every replayed run's request stream is stored unchanged\n"
    )

    was = sha256_of(stored["s1"])
    stored["s1"].write_bytes(b"s1" * 99 + b"x1")
    stored["s2"].unlink()
    run("s4-replay", "s4", records=False)
    assert audit.main(argv) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{where}: 5 replayed runs whose request stream is gone or changed"
    assert out[1].split() == ["run", "id", "run", "stream", "key", "what", "is", "wrong"]
    changed = (
        f"changed: the requests.npz of run {ids['s1-rec']} hashes to "
        f"{sha256_of(stored['s1'])[:12]}, the run replayed {was[:12]}"
    )
    missing = f"gone: the requests.npz of run {ids['s2-rec']} is missing"
    assert {tuple(line.split(maxsplit=3)) for line in out[2:]} == {
        (ids["s1-rec"], "s1-rec", "s1", changed),
        (ids["s1-replay"], "s1-replay", "s1", changed),
        (ids["s2-rec"], "s2-rec", "s2", missing),
        (ids["s2-replay"], "s2-replay", "s2", missing),
        (ids["s4-replay"], "s4-replay", "s4", "gone: no run holds this stream any more"),
    }
    # Read only: no store or experiment is made where there is none.
    assert audit.main(["--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 1
    assert audit.main(["--tracking-uri", tracker.uri, "--experiment", "nope"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"mlflow.tracking_uri=sqlite:///{tmp_path}/none.db: there is no database "
        f"{tmp_path}/none.db",
        f"mlflow.tracking_uri={tracker.uri} has no experiment 'nope'",
    ]
    assert not (tmp_path / "none.db").exists()
