"""Synthetic multi-step arithmetic word problems in GSM8K format, the shipped tiny model's task.

A problem is a start value and a chain of operations (+b, -b, *k), asked as a short word problem
and answered with worked steps: `374+586=960. 960-129=831. 831*7=5817. #### 5817`.

The eval split is disjoint from training by construction: a problem belongs to eval iff the
SHA-256 of its canonical expression (`374+586-129*7`) falls in bucket 0 of EVAL_BUCKETS, and the
train sampler rejects that bucket. Hashing the expression rather than the wording means the same
arithmetic cannot leak into training under a different name.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from slicemoe.eval import Doc, Task, register
from slicemoe.eval.gsm8k import score_gsm8k_style

EVAL_BUCKETS = 10
MAX_VALUE = 9999  # every intermediate result stays within 4 digits
# Eval levels (steps, operand digits, multiplier digits), cycled through by document index:
# 3 steps on 3-digit operands with no, a 1-digit or a 2-digit multiplier. The 2-digit multiply
# is what the tiny model gets only about half right, so full precision lands well inside
# 60-90% and lost precision shows. The run generates at most EvalConfig.max_new_tokens (64)
# tokens, so an eval answer must fit in MAX_ANSWER_CHARS characters; longer ones are redrawn.
EVAL_LEVELS = ((3, 3, 0), (3, 3, 1), (3, 3, 2))
EVAL_SIZE = 1000  # the whole eval split; EvalConfig.limit takes a prefix
MAX_ANSWER_CHARS = 60
STOP = ("Question:", "\n\n")

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia"]
ITEMS = ["apples", "coins", "books", "cards", "shells", "stamps", "marbles", "pens", "beads"]
ADD = ["buys {} more", "finds {} more", "gets {} more", "wins {} more"]
SUB = ["sells {}", "loses {}", "gives away {}", "uses {}"]
MUL = "ends with {} times as many"


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # ("+", 58), ("-", 129), ("*", 3)
    name: str
    item: str
    verbs: tuple[int, ...]  # which phrasing each op uses

    @property
    def canonical(self) -> str:
        return str(self.start) + "".join(f"{op}{b}" for op, b in self.ops)

    def values(self) -> list[int]:
        v, out = self.start, [self.start]
        for op, b in self.ops:
            v = v + b if op == "+" else v - b if op == "-" else v * b
            out.append(v)
        return out

    @property
    def result(self) -> int:
        return self.values()[-1]

    def question(self) -> str:
        clauses = []
        for (op, b), verb in zip(self.ops, self.verbs):
            table = ADD if op == "+" else SUB if op == "-" else [MUL]
            clauses.append(table[verb % len(table)].format(b))
        chain = ", ".join(clauses[:-1]) + (", then " if len(clauses) > 1 else "") + clauses[-1]
        return (
            f"{self.name} has {self.start} {self.item}. {self.name} {chain}. "
            f"How many {self.item} does {self.name} have now?"
        )

    def answer(self) -> str:
        vals = self.values()
        steps = [f"{a}{op}{b}={c}." for a, (op, b), c in zip(vals, self.ops, vals[1:])]
        return " ".join(steps) + f" #### {vals[-1]}"

    def block(self) -> str:
        return f"Question: {self.question()}\nAnswer: {self.answer()}\n\n"


def is_eval(canonical: str) -> bool:
    h = int.from_bytes(hashlib.sha256(canonical.encode()).digest()[:8], "big")
    return h % EVAL_BUCKETS == 0


def sample(rng: random.Random, steps: int, digits: int, mul: int) -> Problem:
    """One problem: `steps` operations on `digits`-digit operands, one of them a multiplication
    by a `mul`-digit number (mul=0: add/sub only). Either split."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    v = rng.randint(lo, hi)
    start, ops = v, []
    mul_at = rng.randrange(steps) if mul else steps
    for i in range(steps):
        klo, khi = max(2, 10 ** (mul - 1)), min(10**mul - 1, MAX_VALUE // max(v, 1))
        if i >= mul_at and v >= 2 and klo <= khi:
            # Deferred to a later step while the product would overflow MAX_VALUE.
            k = rng.randint(klo, khi)
            ops.append(("*", k))
            v *= k
            mul_at = steps
            continue
        can_add, can_sub = v + lo <= MAX_VALUE, v >= lo
        if can_add and (not can_sub or rng.random() < 0.5):
            b = rng.randint(lo, min(hi, MAX_VALUE - v))
            ops.append(("+", b))
            v += b
        else:
            b = rng.randint(lo, min(hi, v))
            ops.append(("-", b))
            v -= b
    verbs = tuple(rng.randrange(12) for _ in ops)
    return Problem(start, tuple(ops), rng.choice(NAMES), rng.choice(ITEMS), verbs)


def sample_split(rng: random.Random, split: str, level: tuple[int, int, int]) -> Problem:
    """Rejection-sample a (steps, digits, mul) problem until it lands in `split`."""
    want_eval = split == "eval"
    while True:
        p = sample(rng, *level)
        if is_eval(p.canonical) != want_eval:
            continue
        too_long = len(" " + p.answer()) > MAX_ANSWER_CHARS
        if want_eval and (too_long or level[2] and not any(op == "*" for op, _ in p.ops)):
            continue
        return p


def fewshot_prefix(rng: random.Random, n: int, level: tuple[int, int, int]) -> str:
    return "".join(sample_split(rng, "train", level).block() for _ in range(n))


def eval_problems(seed: int, n: int, levels=EVAL_LEVELS) -> list[tuple[Problem, tuple]]:
    rng = random.Random(f"arith/eval/{seed}")
    out = []
    for i in range(n):
        level = levels[i % len(levels)]
        out.append((sample_split(rng, "eval", level), level))
    return out


def make_doc(p: Problem, i: int, seed: int, num_fewshot: int, level: tuple[int, int, int]) -> Doc:
    # Few-shot examples come from the train split at the document's level, drawn per document so
    # that a prefix of the doc list is the same whatever `limit` is.
    shots = fewshot_prefix(random.Random(f"arith/shots/{seed}/{level}/{i}"), num_fewshot, level)
    return Doc(
        prompt=f"{shots}Question: {p.question()}\nAnswer:",
        target=str(p.result),
        meta={"expr": p.canonical, "level": list(level), "answer": p.answer()},
    )


def docs(cfg, tokenizer=None, levels=EVAL_LEVELS) -> list[Doc]:
    n = EVAL_SIZE if cfg.limit is None else min(cfg.limit, EVAL_SIZE)
    probs = eval_problems(cfg.seed, n, levels)
    return [make_doc(p, i, cfg.seed, cfg.num_fewshot, lv) for i, (p, lv) in enumerate(probs)]


register(Task(name="arith", kind="generate", docs=docs, score=score_gsm8k_style, stop=STOP))
