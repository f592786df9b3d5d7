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
P_MUL = 0.3  # chance that a step multiplies (at most once per problem)
# Default eval difficulty. The run generates at most EvalConfig.max_new_tokens (64) tokens, so an
# eval answer must fit in MAX_ANSWER_CHARS characters; longer eval problems are redrawn.
EVAL_STEPS = 3
EVAL_DIGITS = 3
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


def sample(rng: random.Random, steps: int, digits: int) -> Problem:
    """One problem of `steps` operations on operands of `digits` digits (either split)."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    v = rng.randint(lo, hi)
    start, ops, used_mul = v, [], False
    for _ in range(steps):
        if not used_mul and 2 <= v <= MAX_VALUE // 2 and rng.random() < P_MUL:
            k = rng.randint(2, min(9, MAX_VALUE // v))
            ops.append(("*", k))
            v *= k
            used_mul = True
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


def sample_split(rng: random.Random, split: str, steps: int, digits: int) -> Problem:
    """Rejection-sample until the problem lands in `split` ("train" or "eval")."""
    want_eval = split == "eval"
    while True:
        p = sample(rng, steps, digits)
        if is_eval(p.canonical) != want_eval:
            continue
        if want_eval and len(" " + p.answer()) > MAX_ANSWER_CHARS:
            continue
        return p


def fewshot_prefix(rng: random.Random, n: int, steps: int, digits: int) -> str:
    return "".join(sample_split(rng, "train", steps, digits).block() for _ in range(n))


def eval_problems(seed: int, n: int, steps: int = EVAL_STEPS, digits: int = EVAL_DIGITS):
    rng = random.Random(f"arith/eval/{seed}/{steps}/{digits}")
    return [sample_split(rng, "eval", steps, digits) for _ in range(n)]


def make_doc(p: Problem, i: int, seed: int, num_fewshot: int, steps: int, digits: int) -> Doc:
    # Few-shot examples come from the train split, drawn per document so that a prefix of the
    # doc list is the same whatever `limit` is.
    shots = fewshot_prefix(random.Random(f"arith/shots/{seed}/{i}"), num_fewshot, steps, digits)
    return Doc(
        prompt=f"{shots}Question: {p.question()}\nAnswer:",
        target=str(p.result),
        meta={"expr": p.canonical, "steps": steps, "digits": digits, "answer": p.answer()},
    )


def docs(cfg, tokenizer=None, steps: int = EVAL_STEPS, digits: int = EVAL_DIGITS) -> list[Doc]:
    n = EVAL_SIZE if cfg.limit is None else min(cfg.limit, EVAL_SIZE)
    probs = eval_problems(cfg.seed, n, steps, digits)
    return [make_doc(p, i, cfg.seed, cfg.num_fewshot, steps, digits) for i, p in enumerate(probs)]


register(Task(name="arith", kind="generate", docs=docs, score=score_gsm8k_style, stop=STOP))
