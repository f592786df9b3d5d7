import random
import re

import pytest

from slicemoe.config import EvalConfig
from slicemoe.eval import arith as A
from slicemoe.eval import get_task
from slicemoe.eval.gsm8k import score_gsm8k_style

TRAIN_LEVELS = [(s, d, m) for s in (2, 3, 4) for d in (2, 3, 4) for m in (0, 1, 2)]
STEP = re.compile(r"(\d+)([+*-])(\d+)=(\d+)\.")


def check_worked(answer: str) -> int:
    """Recompute every step of a worked answer; return the value after '#### '."""
    body, final = answer.split(" #### ")
    steps = STEP.findall(body)
    assert len(steps) == body.count("=") and steps
    prev = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert prev is None or a == prev  # each step continues from the last result
        assert c == (a + b if op == "+" else a - b if op == "-" else a * b)
        assert 0 <= c <= A.MAX_VALUE
        prev = c
    assert int(final) == prev
    return prev


def test_docs_are_deterministic_and_prefix_stable():
    a = A.docs(EvalConfig(limit=30, seed=7))
    b = A.docs(EvalConfig(limit=30, seed=7))
    assert [(d.prompt, d.target) for d in a] == [(d.prompt, d.target) for d in b]
    short = A.docs(EvalConfig(limit=10, seed=7))
    assert [d.prompt for d in short] == [d.prompt for d in a[:10]]
    other = A.docs(EvalConfig(limit=30, seed=8))
    assert [d.target for d in other] != [d.target for d in a]


def test_sampler_is_seeded():
    one = [A.sample_split(random.Random(3), "train", lv).block() for lv in TRAIN_LEVELS]
    two = [A.sample_split(random.Random(3), "train", lv).block() for lv in TRAIN_LEVELS]
    assert one == two


def test_eval_and_train_are_disjoint():
    rng = random.Random(0)
    train = {A.sample_split(rng, "train", rng.choice(TRAIN_LEVELS)).canonical for _ in range(20000)}
    assert not any(A.is_eval(c) for c in train)
    docs = A.docs(EvalConfig(limit=600, seed=1234))
    ev = {d.meta["expr"] for d in docs}
    assert all(A.is_eval(c) for c in ev)
    assert not ev & train
    # The reserved bucket is about 1/EVAL_BUCKETS of all problems, so both splits are large.
    raw = [A.sample(rng, 3, 3, 1).canonical for _ in range(5000)]
    assert 0.07 < sum(map(A.is_eval, raw)) / len(raw) < 0.13


def test_answers_are_correct_arithmetic():
    rng = random.Random(1)
    for _ in range(3000):
        p = A.sample(rng, *rng.choice(TRAIN_LEVELS))
        assert check_worked(p.answer()) == p.result
        nums = [int(x) for x in re.findall(r"\d+", p.question())]
        assert nums == [p.start] + [
            b for _, b in p.ops
        ]  # the question states the operands in order
    for d in A.docs(EvalConfig(limit=300)):
        assert check_worked(d.meta["answer"]) == int(d.target)
        assert len(" " + d.meta["answer"]) <= A.MAX_ANSWER_CHARS
        muls = [b for op, b in re.findall(r"([+*-])(\d+)=", d.meta["answer"]) if op == "*"]
        assert len(muls) == (1 if d.meta["level"][2] else 0)
        if muls:
            assert len(muls[0]) == d.meta["level"][2]  # a 1-digit or a 2-digit multiplier


def test_eval_levels_cycle():
    docs = A.docs(EvalConfig(limit=9))
    assert [tuple(d.meta["level"]) for d in docs] == list(A.EVAL_LEVELS) * 3


@pytest.mark.parametrize("k", [0, 1, 5])
def test_prompt_has_num_fewshot_examples(k):
    for d in A.docs(EvalConfig(limit=6, num_fewshot=k)):
        assert d.prompt.count("Question: ") == k + 1
        assert d.prompt.count("\nAnswer: ") == k and d.prompt.endswith("\nAnswer:")
        assert d.prompt.count("#### ") == k
        assert d.prompt.startswith("Question: ")
        shots = d.prompt.split("\n\n")[:-1]
        for s in shots:
            check_worked(s.split("\nAnswer: ")[1])


def test_extraction_matches_gsm8k():
    task = get_task("arith")
    assert task.kind == "generate" and task.score is score_gsm8k_style
    assert task.stop == ("Question:", "\n\n")
    d = A.docs(EvalConfig(limit=3))[2]
    assert score_gsm8k_style(d, " " + d.meta["answer"]) == {
        "accuracy": 1.0,
        "accuracy_flexible": 1.0,
    }
    wrong = d.meta["answer"].rsplit(" ", 1)[0] + f" {int(d.target) + 1}"
    assert score_gsm8k_style(d, wrong)["accuracy"] == 0.0
    # No "####": strict misses, flexible takes the last number.
    body = " " + d.meta["answer"].split(" ####")[0]
    assert score_gsm8k_style(d, body) == {"accuracy": 0.0, "accuracy_flexible": 1.0}
    big = f"#### {int(d.target):,}."
    assert score_gsm8k_style(d, big)["accuracy"] == 1.0
