"""GSM8K, prompted and scored as lm-evaluation-harness's `gsm8k` task (version 3.0).

Prompt: `num_fewshot` worked examples from the train split, then the test question, as
`Question: {q}\\nAnswer: {worked answer}\\n\\n` ... `Question: {q}\\nAnswer:`.
The examples come from one `random.Random(seed)` drawn in test-set order, as lm-eval's default
sampler does, so test document i always gets the i-th draw whatever `limit` is. lm-eval only
excludes the evaluated document when the examples come from the test split itself; here they
come from train, so nothing is excluded.

Scoring: lm-eval's "strict-match" (`#### N`) and "flexible-extract" (last number) filters, then
its exact match: drop `,` and `$`, everything up to the last `#### `, one final `.`, then compare
case-insensitively. The arithmetic task scores with the same functions.
"""

from __future__ import annotations

import functools
import json
import random
import re
from pathlib import Path

from slicemoe.eval import Doc, Task, register

STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")  # applied in this order, as lm-eval does
STOP = ("Question:", "</s>", "<|im_end|>")
HINT = (
    "set eval.data_path to a directory holding GSM8K's train.jsonl and test.jsonl "
    '(one {"question", "answer"} object per line), e.g. eval.data_path=../shared/data/gsm8k'
)


def extract_strict(text: str) -> str | None:
    """The number after the first `#### `, or None (lm-eval scores that as "[invalid]")."""
    m = STRICT.search(text)
    return m.group(1).strip() if m else None


def extract_flexible(text: str) -> str | None:
    """The last number-like span (digits with `$ , .`, or a bare digit), or None."""
    found = FLEXIBLE.findall(text)
    if not found:
        return None
    # Each match is a (long form, bare digits) pair with exactly one side non-empty.
    return next(g for g in found[-1] if g).strip()


def normalize(s: str) -> str:
    for pattern in IGNORE:
        s = re.sub(pattern, "", s)
    return s.lower()


def score_gsm8k_style(doc: Doc, text: str) -> dict[str, float]:
    target = normalize(doc.target)

    def hit(pred: str | None) -> float:
        return float(pred is not None and normalize(pred) == target)

    return {"accuracy": hit(extract_strict(text)), "accuracy_flexible": hit(extract_flexible(text))}


def question(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer:"


def docs(cfg, tokenizer=None) -> list[Doc]:
    train, test = load_splits(cfg.data_path)
    k = cfg.num_fewshot
    if not 0 <= k <= len(train):
        raise ValueError(f"eval.num_fewshot={k} must be between 0 and {len(train)} (train size)")
    rnd = random.Random(cfg.seed)
    out = []
    for i, row in enumerate(test[: cfg.limit]):
        # lm-eval draws nothing for 0 shots, so the generator state must not advance either.
        shots = rnd.sample(range(len(train)), k) if k else []
        context = "".join(f"{question(train[j])} {train[j]['answer']}\n\n" for j in shots)
        out.append(
            Doc(
                prompt=context + question(row),
                target=normalize(row["answer"]),
                meta={"index": i, "answer": row["answer"], "fewshot": shots},
            )
        )
    return out


def check_data(path: str | None) -> None:
    """Both splits read whole at launch: a malformed line stops it, naming the file and line."""
    files = data_files(path)
    _check_files(tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files))


@functools.lru_cache(maxsize=8)
def _check_files(stamps: tuple[tuple[str, int, int], ...]) -> None:
    # Once per file version: a sweep validates every job, and train.jsonl has 7473 lines.
    for name, _, _ in stamps:
        read_jsonl(Path(name))


def data_files(path: str | None) -> list[Path]:
    if path is None:
        raise ValueError(f"eval.data_path not set: {HINT}")
    root = Path(path)
    files = [root / "train.jsonl", root / "test.jsonl"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"eval.data_path={path!r} lacks {', '.join(missing)}: {HINT}")
    return files


def load_splits(path: str | None) -> tuple[list[dict], list[dict]]:
    train, test = data_files(path)
    return read_jsonl(train), read_jsonl(test)


def read_jsonl(file: Path) -> list[dict]:
    rows = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{file}:{n}: not JSON ({err.msg}); fix or delete that line"
                ) from None
            if not isinstance(row, dict) or not {"question", "answer"} <= row.keys():
                raise ValueError(
                    f"{file}:{n}: expected an object with question and answer; fix or delete "
                    "that line"
                )
            rows.append(row)
    return rows


TASK = register(
    Task(
        name="gsm8k",
        kind="generate",
        docs=docs,
        score=score_gsm8k_style,
        stop=STOP,
        check_data=check_data,
    )
)
