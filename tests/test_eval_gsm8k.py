"""GSM8K prompts and scores agree with lm-evaluation-harness's gsm8k task.

Two routes to the same proof: tests/data/gsm8k_lmeval_golden.json holds what lm-eval 0.4.13
produced (prompt hashes, few-shot draws, filtered answers, exact match; regenerate with
tests/data/make_gsm8k_golden.py), and when lm-eval is installed the comparison is also run live.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest

from slicemoe.config import EvalConfig
from slicemoe.eval import Doc, get_task
from slicemoe.eval.gsm8k import (
    docs,
    extract_flexible,
    extract_strict,
    normalize,
    score_gsm8k_style,
)

DATA = Path(__file__).parent / "data"
MINI = DATA / "gsm8k_mini"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
GOLDEN = json.loads((DATA / "gsm8k_lmeval_golden.json").read_text())
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared GSM8K data not present")


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_docs(path: Path, limit: int | None = None, **kw) -> list[Doc]:
    return docs(EvalConfig(task="gsm8k", data_path=str(path), limit=limit, **kw))


def golden_helpers(monkeypatch):
    # lm-eval must never reach for the hub here; the env change is undone after the test.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location(
        "make_gsm8k_golden", DATA / "make_gsm8k_golden.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prompt_layout():
    d = make_docs(MINI)
    assert len(d) == 3
    first = d[0]
    # Five solved examples, then the open question with no space after "Answer:".
    assert first.prompt.count("Question: ") == 6 and first.prompt.count("\n\n") >= 5
    assert first.prompt.startswith("Question: ") and first.prompt.endswith("\nAnswer:")
    assert "Janet" in first.prompt.rsplit("\n\n", 1)[1]
    assert first.target == "18" and first.meta["answer"].endswith("#### 18")
    assert len(set(first.meta["fewshot"])) == 5


def test_limit_is_a_prefix_and_zero_shot_draws_nothing():
    assert [x.prompt for x in make_docs(MINI, limit=2)] == [x.prompt for x in make_docs(MINI)[:2]]
    zero = make_docs(MINI, num_fewshot=0)
    assert zero[0].prompt.startswith("Question: Janet") and zero[0].meta["fewshot"] == []


def test_registered():
    task = get_task("gsm8k")
    assert task.kind == "generate" and task.docs is docs and task.score is score_gsm8k_style
    assert list(task.stop) == GOLDEN["until"] == ["Question:", "</s>", "<|im_end|>"]


def test_prompts_match_lm_eval_golden_mini():
    ours = make_docs(MINI)
    assert [x.meta["fewshot"] for x in ours] == [g["fewshot"] for g in GOLDEN["mini"]]
    assert [sha(x.prompt) for x in ours] == [g["sha256"] for g in GOLDEN["mini"]]


@needs_shared
def test_prompts_match_lm_eval_golden_full_data():
    ours = make_docs(SHARED, limit=len(GOLDEN["shared"]))
    assert [x.meta["fewshot"] for x in ours] == [g["fewshot"] for g in GOLDEN["shared"]]
    assert [sha(x.prompt) for x in ours] == [g["sha256"] for g in GOLDEN["shared"]]
    # Every reference answer normalises to a plain integer and normalising is idempotent.
    for x in make_docs(SHARED):
        assert x.target.lstrip("-").isdigit() and normalize(x.target) == x.target


@pytest.mark.parametrize("row", GOLDEN["responses"], ids=lambda r: repr(r["response"])[:30])
def test_scores_match_lm_eval_golden(row):
    def as_lm_eval(value):
        return "[invalid]" if value is None else value

    assert as_lm_eval(extract_strict(row["response"])) == row["strict"]
    assert as_lm_eval(extract_flexible(row["response"])) == row["flexible"]
    doc = Doc(prompt="", target=normalize(row["answer"]))
    assert score_gsm8k_style(doc, row["response"]) == {
        "accuracy": row["exact_match_strict"],
        "accuracy_flexible": row["exact_match_flexible"],
    }


def test_extraction_tricky_strings():
    assert extract_strict("so -3 apples.\n#### -3") == "-3"
    assert extract_strict("#### 1,234.") == "1,234."
    assert extract_strict("#### 7\n#### 8") == "7"  # the first marked answer counts
    assert extract_strict("The answer is 7") is None
    assert extract_strict("#### $7") is None
    assert extract_flexible("from -12 to 3.5, then $1,000.") == "$1,000."
    assert extract_flexible("x is -3") == "-3"
    assert extract_flexible("just 7 left") == "7"
    assert extract_flexible("no digits") is None
    assert normalize("$1,000.") == "1000"
    assert normalize("A long derivation\n#### 4,200") == "4200"
    assert normalize("3.50") == "3.50"  # no numeric equivalence, exactly like lm-eval
    doc = Doc(prompt="", target="-1234")
    assert score_gsm8k_style(doc, "It drops by 1,234.\n#### -1,234") == {
        "accuracy": 1.0,
        "accuracy_flexible": 1.0,
    }
    assert score_gsm8k_style(doc, "") == {"accuracy": 0.0, "accuracy_flexible": 0.0}
    # Targets given unnormalised (as the arithmetic task may) still compare equal.
    assert score_gsm8k_style(Doc(prompt="", target="1,234"), "#### 1234")["accuracy"] == 1.0


def test_data_path_errors(tmp_path):
    with pytest.raises(ValueError, match="eval.data_path"):
        make_docs(tmp_path / "nowhere")
    (tmp_path / "train.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(ValueError, match=r"eval.data_path.*test.jsonl"):
        make_docs(tmp_path)
    # Data never comes from the network: an unset path is refused, `datasets` installed or not.
    with pytest.raises(ValueError, match="eval.data_path not set"):
        docs(EvalConfig(task="gsm8k", data_path=None))


def test_too_many_shots():
    with pytest.raises(ValueError, match="eval.num_fewshot"):
        make_docs(MINI, num_fewshot=11)


lm_eval_live = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed (golden file used)"
)


@lm_eval_live
def test_prompts_match_lm_eval_live(tmp_path, monkeypatch):
    helpers = golden_helpers(monkeypatch)
    sources = [(MINI, None)] + ([(SHARED, 40)] if SHARED.is_dir() else [])
    for path, limit in sources:
        theirs = helpers.lm_eval_prompts(path, limit, cache_dir=tmp_path)
        ours = make_docs(path, limit=limit)
        assert [x.prompt for x in ours] == [prompt for prompt, _ in theirs]
        assert all(kw["until"] == list(get_task("gsm8k").stop) for _, kw in theirs)


@lm_eval_live
def test_scores_match_lm_eval_live(monkeypatch):
    # The installed lm-eval still produces the golden rows, which test_scores_match_lm_eval_golden
    # holds our extraction and scoring to.
    assert golden_helpers(monkeypatch).lm_eval_scores() == GOLDEN["responses"]
