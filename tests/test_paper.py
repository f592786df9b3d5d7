"""The paper's presets and the documentation's commands: the grids sweeper, `+experiment=paper_all`
composing into exactly the sweeps of its parts, every command line of README.md and docs/*.md
checked along with their links, and (slow) the paper commands they show run small, with the
report opened in a headless browser."""

from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from conftest_sweep import REPO, empty_store, run_sweep
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from slicemoe.eval import shipped
from slicemoe.validate import validate
from sweep import app, grids, schema
from sweep.errors import SweepError
from sweep.grids import expand

# On one xdist worker, so that the small paper_all sweep is built once.
pytestmark = pytest.mark.xdist_group("test_paper")

PARSER = OverridesParser.create()
# Data of the same layout, for a docs command's data path of another machine.
STAND_IN_DATA = {
    "gsm8k": REPO / "tests/data/gsm8k_mini",
    "wikitext": shipped("wikitext-2-test-head.txt"),
}
BIN = Path(sys.executable).parent


product = partial(grids.product, PARSER)


def compose_app(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(app.CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra)


# --- the grids sweeper --------------------------------------------------------------------------


def test_grids_are_a_union_of_products_and_the_command_line_wins():
    grids = {
        "a": {"policy": "dbsc,lru_highbit", "cache": "frac_10,frac_25"},
        "b": {"policy": "dbsc", "bits.nonexpert_bits": None, "bits.symmetric": True},
        "c": {"policy": "lru_highbit", "cache": "frac_10"},  # a job of grid a again
    }
    got = expand(grids, ["model=m"], product)
    assert got == [
        ["policy=dbsc", "cache=frac_10", "model=m"],
        ["policy=dbsc", "cache=frac_25", "model=m"],
        ["policy=lru_highbit", "cache=frac_10", "model=m"],
        ["policy=lru_highbit", "cache=frac_25", "model=m"],
        ["policy=dbsc", "bits.nonexpert_bits=null", "bits.symmetric=True", "model=m"],
    ]
    # An override on the command line replaces a grid's values for that key, in every grid.
    got = expand(grids, ["cache=frac_50"], product)
    assert len(got) == 3 and all(job[-1] == "cache=frac_50" for job in got)
    assert not [o for job in got for o in job if o.startswith("cache=frac_1")]
    with pytest.raises(SweepError, match="has no grids"):
        expand({}, [], product)
    with pytest.raises(SweepError, match="hydra.sweeper.grids.a is empty"):
        expand({"a": {}}, [], product)


def test_the_sweeper_plugin_expands_the_grids_and_batches_them():
    from hydra_plugins.slicemoe_sweeper.slicemoe_sweeper import GridsSweeper

    sweeper = GridsSweeper({"g": {"cache": "frac_10,frac_25,frac_50"}}, max_batch_size=2)
    sweeper.hydra_context = SimpleNamespace(config_loader=None)
    batches = sweeper.split_arguments(PARSER.parse_overrides(["seed=1"]), 2)
    assert batches == [
        [["cache=frac_10", "seed=1"], ["cache=frac_25", "seed=1"]],
        [["cache=frac_50", "seed=1"]],
    ]


# --- the presets ---------------------------------------------------------------------------------


def preset_jobs(preset: str, *args: str) -> list[list[str]]:
    cfg = compose_app([f"+experiment={preset}", *args], hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("GridsSweeper")
    return expand(cfg.hydra.sweeper.grids, [f"+experiment={preset}", *args], product)


def test_paper_all_is_exactly_the_sweeps_of_the_figures_and_table1():
    parts = {p: preset_jobs(p) for p in ("paper_fig8", "paper_fig10", "paper_table1")}
    everything = preset_jobs("paper_all")

    def own(job):
        return [o for o in job if not o.startswith("+experiment=")]

    assert [own(j) for j in everything] == [own(j) for p in parts.values() for j in p]
    fig8, fig10, table1 = parts.values()
    assert [len(p) for p in parts.values()] == [5 * 3 + 4 * 3, 5, 6 + 6 + 9]
    assert {o for j in fig8 for o in j if o.startswith("policy.lam=")} == {
        f"policy.lam={lam}" for lam in (0.05, 0.1, 0.2, 0.3)
    }
    assert {o for j in fig10 for o in j if o.startswith("policy.warmup=")} == {
        f"policy.warmup={w}" for w in ("empty", "last_layer", "random", "lru", "pcw")
    }
    assert all({"eval=wikitext_head", "bits.nonexpert_bits=null"} <= set(j) for j in table1)
    # The figures' runs share one arithmetic eval, large enough for paired comparisons.
    assert all("eval=arith_paper" in j for j in fig8 + fig10)
    arith = schema.run_config(compose_app(fig10[0])).eval
    assert (arith.task, arith.limit) == ("arith", 125)
    low = [j for j in table1 if "policy=lru_lowbit" in j]
    assert sorted(o for j in low for o in j if o.startswith("bits.scheme=")).count(
        "bits.scheme=amat"
    ) == 3 and not [j for j in low if {"bits.scheme=amat", "bits.symmetric=True"} <= set(j)]
    # The text is the one shipped with the package: no data folder needed.
    cfg = schema.run_config(compose_app(table1[0]))
    assert cfg.eval.task == "wikitext" and Path(cfg.eval.data_path).is_file()
    assert Path(cfg.eval.data_path).parent == REPO / "slicemoe" / "eval" / "data"


def test_the_real_model_grid_is_the_papers_evaluation_under_both_profiles(monkeypatch):
    monkeypatch.setenv("SLICEMOE_DATA", "/data")
    jobs = preset_jobs("paper_grid_real", "model=qwen1.5-moe-a2.7b")
    gsm8k = [dict(o.split("=", 1) for o in j) for j in jobs if "eval=gsm8k" in j]
    table1 = [j for j in jobs if "eval=wikitext" in j]
    # Figs. 8-9: six policies and Cache-Prior at three lambdas at four sizes; Fig. 10: five
    # warmups at one; each under both profiles. Table 1: 6 high-bit and 15 low-bit rows.
    assert (len(gsm8k), len(table1)) == ((6 * 4 + 3 * 4 + 5) * 2, 21)
    assert {j["cache"] for j in gsm8k} == {"1.2gb", "1.8gb", "2.4gb", "3.6gb"}
    assert all(j["eval.data_path"] == "/data/gsm8k" and j["eval.limit"] == "null" for j in gsm8k)
    profiles = {}
    for j in gsm8k:
        rest = tuple(sorted((k, v) for k, v in j.items() if k != "hardware"))
        profiles.setdefault(rest, set()).add(j["hardware"])
    assert all(p == {"mobile_lpddr4_ufs31", "laptop_lpddr5_nvme"} for p in profiles.values())


def test_a_model_on_the_command_line_reaches_every_job_of_paper_all():
    args = ["model=qwen1.5-moe-a2.7b", "model.path=/models/q"]
    everything = preset_jobs("paper_all", *args)
    assert len(everything) == 53 and all(set(args) <= set(job) for job in everything)
    cfg = schema.run_config(compose_app(everything[-1]))
    assert (cfg.model.name, cfg.model.path, cfg.eval.task) == (
        "qwen1.5-moe-a2.7b",
        "/models/q",
        "wikitext",
    )


# --- the documentation's command lines and links ------------------------------------------------

# The README first, so that a command it shows is the one found by its start (doc_line).
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_commands() -> list[str]:
    """Every command of the bash blocks of README.md and docs/*.md: continuation lines joined,
    comments dropped, `a && b` split."""
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                commands += [c.strip() for c in line.split("&&") if c.strip()]
    return commands


def covering(todo: list[list[str]], seen: set[str]) -> list[list[str]]:
    """The first job of `todo` and those that hold an override not `seen` before (in any
    command): every override of the docs is composed and validated at least once."""
    keep = []
    for job in todo:
        if not keep or not seen >= set(job):
            keep.append(job)
            seen |= set(job)
    return keep


def check_sweep(args: list[str], seen: set[str]) -> None:
    """Expand `python -m sweep ARGS` into its jobs as the sweeper would and compose and validate
    jobs holding every override among them, without running anything. A model.path of another
    machine is left out of the checks that read it; a data path of another machine is checked
    as data of the same layout shipped here."""
    args = [a for a in args if a not in ("-m", "--multirun", "...") and not a.endswith("=...")]
    app.check_command_line(args)  # no docs override is taken for a typo
    parsed = PARSER.parse_overrides(args)
    base = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeper = compose_app(base, hydra=True).hydra.sweeper
    if sweeper._target_.endswith("GridsSweeper"):
        todo = expand(sweeper.grids, args, product)
    elif sweeper._target_.endswith("BasicSweeper"):
        todo = product(args)
    else:  # an optimiser samples its jobs: the base config
        todo = [base]
    for job in covering(todo, seen):
        cfg = schema.run_config(compose_app(job))
        here = cfg.model.path is None or Path(cfg.model.path).exists()
        if cfg.stream_file and not Path(cfg.stream_file).exists():  # a trace of another machine
            cfg, here = replace(cfg, stream_file=None), False
        if not here:  # shapes from the shipped config.json instead
            cfg = replace(cfg, model=replace(cfg.model, path=None))
        if cfg.eval.data_path and not Path(cfg.eval.data_path).exists():
            stand_in = str(STAND_IN_DATA[cfg.eval.task])
            cfg = replace(cfg, eval=replace(cfg.eval, data_path=stand_in))
        validate(cfg, weights=here)


def check_command(command: str, seen: set[str]) -> None:
    words = shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", command))  # `<parent run id>`
    env = {}
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value prefixes
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    with mock.patch.dict(os.environ, env):
        check_words(command, words, seen)


# Modules whose command lines the docs give: their argument parsers must take them.
PARSED_MODULES = ("slicemoe.traces", "slicemoe.table1", "slicemoe.hf_trace")


def check_words(command: str, words: list[str], seen: set[str]) -> None:
    head = " ".join(words[:3])
    if words[:2] == ["ray", "job"]:  # `ray job submit ... -- COMMAND`
        assert (BIN / "ray").exists()
        return check_command(shlex.join(words[words.index("--") + 1 :]), seen)
    if re.fullmatch(r"(\.venv/bin/)?python -m sweep", head) or words[0] == "slicemoe-sweep":
        n = 1 if words[0] == "slicemoe-sweep" else 3
        check_sweep(words[n:], seen)
    elif head.endswith("python -m sweep.report"):
        from sweep.report.__main__ import parser

        parser().parse_args(words[3:])
    elif head.endswith("python -m sweep.sync"):  # run from a scratch folder: nothing to push
        from sweep.sync import main

        # A spool folder the docs name (`/path/to/mlflow-spool`) is not on this machine.
        named = words[3:] and not words[3].startswith("-")
        assert main(words[3:]) == (1 if named else 0)
    elif any(head.endswith(f"python -m {m}") for m in PARSED_MODULES):
        importlib.import_module(words[2]).parser().parse_args(words[3:])
    elif head.endswith("python -m pytest"):
        assert (REPO / "tests").is_dir()
    elif words[0] == "python" and words[1].endswith(".py"):
        assert (REPO / words[1]).is_file(), command
    elif words[:2] == ["bash", "install.sh"]:
        assert (REPO / "install.sh").is_file()
    elif words[:2] == ["jupyter", "execute"]:
        assert (BIN / "jupyter-execute").exists() and (REPO / words[2]).is_file()
    elif words[0] in ("mlflow", "ray"):
        assert (BIN / words[0]).exists(), f"{words[0]} is not installed in the venv"
    elif words[0] in ("export", "mkdir"):
        pass
    else:
        raise AssertionError(f"docs command not checked by tests/test_paper.py: {command}")


def test_every_command_line_of_the_docs_composes_validates_or_parses(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths of the commands point at nothing of the clone
    commands = doc_commands()
    assert any("+experiment=paper_all" in c for c in commands)
    # The README's test command is the one CI runs.
    assert (REPO / ".ci" / "run").read_text().strip().splitlines()[-1] in commands
    seen: set[str] = set()
    for command in commands:
        check_command(command, seen)


def test_every_relative_link_of_the_docs_points_at_a_file():
    """`](path)` links and images of README.md and docs/*.md, relative to the page."""
    images, missing = 0, []
    for doc in DOCS:
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for image, target in re.findall(r"(!?)\[[^\]]*\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:|#", target):  # a web address or an anchor of the page
                continue
            images += bool(image)
            if not (doc.parent / target.split("#")[0]).is_file():
                missing.append(f"{doc.relative_to(REPO)}: {target}")
    assert not missing
    assert images >= 4
    pages = {p.name for p in (REPO / "docs").glob("*.md")}
    linked = set(re.findall(r"\]\(docs/([^)#]+\.md)", (REPO / "README.md").read_text()))
    assert pages == linked, "every docs page is linked from the README"


# --- the docs' paper commands, small, and the report in a browser ----------------------------

# Small enough for CI: one cache size, MAT84 and the Asym quantizer only, one baseline strength,
# 2 problems or text windows of 64 tokens, one actor (a second one's start, torch and the model,
# costs more CPU than its share of such short passes saves: 107-126 s of CPU -> 89-107 s here).
SMALL = [
    "cache=frac_25", "bits=mat84", "bits.symmetric=false", "policy.lam=0.2", "eval.limit=2",
    "eval.max_new_tokens=12", "eval.seq_len=64", "eval.stride=64", "sweep.miss_ratio_points=5",
    "ray.num_actors=1",
]  # fmt: skip


def doc_line(start: str) -> list[str]:
    """The words of the docs' first command that starts with `start`."""
    return shlex.split(next(c for c in doc_commands() if c.startswith(start)))


@pytest.fixture(scope="module")
def paper_sweep(tmp_path_factory, ray_head):
    """The docs' paper_all command, small, in a scratch folder with its own MLflow store."""
    tmp = tmp_path_factory.mktemp("paper")
    words = doc_line("python -m sweep -m +experiment=paper_all")
    assert words[:3] == ["python", "-m", "sweep"] and len(words) == 5
    uri = empty_store(tmp)
    res = run_sweep(
        [*words[3:], *SMALL, f"mlflow.tracking_uri={uri}"], tmp, timeout=600, ray=ray_head
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return tmp, uri, res


@pytest.mark.slow
def test_the_docs_paper_commands_run_and_the_report_renders_in_a_browser(paper_sweep):
    import numpy as np
    from matplotlib.image import imread

    tmp, uri, res = paper_sweep
    # 5 policies, the baseline, 5 warmups (lru is dbsc's own run), 4 Table 1 cells at MAT84.
    assert "[sweep] 15/15 done | 0 running | 0 failed | 1 skipped" in res.stderr
    words = doc_line("python -m sweep.report")
    out = tmp / "report"
    rep = subprocess.run(
        [sys.executable, *words[1:], "--tracking-uri", uri, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert rep.returncode == 0, rep.stderr[-3000:]
    assert "2 settings that must not share a figure" in rep.stderr and "skipped" not in rep.stderr
    figures = ("accuracy_vs_miss_rate", "energy_latency", "warmup", "miss_ratio_curves",
               "optimality_gap")  # fmt: skip
    for name in figures:
        (png,) = out.glob(f"{name}*.png")
        assert png.stat().st_size > 10_000, name
    (table,) = (path.read_text() for path in out.glob("table1*.md"))
    amat = next(line for line in table.splitlines() if line.startswith("| AMAT |"))
    assert amat.startswith("| AMAT | amat | - | - | - | - | ") and "-" not in amat[32:]
    page = out / "index.html"
    assert page.read_text().count("<b>This data:</b>") == 6
    png = tmp / "page.png"
    screenshot(page, png)
    pixels = imread(png)[..., :3]
    assert pixels.shape[:2] == (2400, 1280)
    # Not blank: text, tables and figures, not one colour.
    ink = (pixels.min(axis=-1) < 0.6).mean()
    colour = (pixels.max(axis=-1) - pixels.min(axis=-1) > 0.3).mean()
    assert ink > 0.01 and colour > 0.01 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50


@pytest.mark.slow
def test_the_docs_notebook_command_runs_headless(paper_sweep):
    """The docs' `jupyter execute` line as written, from a folder holding mlflow.db and the
    notebook as the repository root does: figures and the executed notebook in ./figs."""
    import json
    import os

    tmp, _, _ = paper_sweep
    assert doc_line("mkdir -p figs") == ["mkdir", "-p", "figs"]
    (tmp / "figs").mkdir()
    words = [w.replace("$PWD", str(tmp)) for w in doc_line("SLICEMOE_FIG_DIR=")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while re.fullmatch(r"[A-Z_]+=\S*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[:2] == ["jupyter", "execute"]
    (tmp / "notebooks").mkdir()
    shutil.copy(REPO / words[2], tmp / words[2])
    res = subprocess.run(
        [str(BIN / "jupyter"), *words[1:]], cwd=tmp, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    figures = {p.name for p in (tmp / "figs").glob("*.png")}
    assert {"accuracy_vs_miss_rate.png", "energy_latency.png", "warmup.png"} <= figures
    assert "miss_ratio_curves.png" in figures and not list((tmp / "notebooks").glob("**/*.png"))
    executed = json.loads((tmp / "figs" / "compare_policies.ipynb").read_text())["cells"]
    code = [c for c in executed if c["cell_type"] == "code"]
    assert all(c["execution_count"] for c in code)
    assert any(o["output_type"] == "display_data" for c in code for o in c["outputs"])


def screenshot(page: Path, png: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here (Debian: apt-get install chromium; .ci/run installs it)")
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--hide-scrollbars", f"--user-data-dir={png.parent / 'chromium-profile'}",
        "--window-size=1280,2400", f"--screenshot={png}",
    ]  # fmt: skip
    res = subprocess.run(
        [chromium, *flags, page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and png.is_file(), res.stderr[-2000:]
