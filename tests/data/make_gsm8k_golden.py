"""Regenerate gsm8k_lmeval_golden.json by running lm-evaluation-harness itself.

    pip install "lm-eval==0.4.13" && python tests/data/make_gsm8k_golden.py

lm-eval's own gsm8k.yaml is loaded from the installed package and only its dataset is pointed at
local jsonl files, so prompts, few-shot draws (seed 1234), filters and exact match are lm-eval's.
tests/test_eval_gsm8k.py imports the helpers below to repeat the comparison live when lm-eval is
installed, and checks the recorded answers when it is not. gsm8k_mini/ holds the first 10 train
and 3 test problems of GSM8K (MIT licence, copied beside them).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MINI = HERE / "gsm8k_mini"
SHARED = HERE.parents[2] / "shared" / "data" / "gsm8k"
GOLDEN = HERE / "gsm8k_lmeval_golden.json"
N_SHARED = 25  # test documents of the full data set recorded (each 5-shot prompt is ~4 KB)

# (model response, reference answer) pairs that exercise both filters and the normalisation.
RESPONSES = [
    ("She sells 9 eggs.\nShe makes 9 * 2 = $18.\n#### 18", "x\n#### 18"),
    ("#### 18.", "#### 18"),
    ("#### -5", "#### -5"),
    ("The change is -5 degrees.", "#### -5"),
    ("#### 1,234", "#### 1234"),
    ("The total is 1,000,000", "#### 1000000"),
    ("It costs $5", "#### 5"),
    ("She pays $12.50 in total.", "#### 12.5"),
    ("#### $7", "#### 7"),
    ("3 + 4 = 7 apples.", "#### 7"),
    ("#### 5\n#### 6", "#### 5"),
    ("#### 5\n#### 6", "#### 6"),
    ("The answer is 8.0", "#### 8"),
    ("no numbers here", "#### 3"),
    ("", "#### 3"),
    ("#### .5", "#### .5"),
    ("result - 5", "#### 5"),
    ("It is 3.14159.", "#### 3.14159"),
    ("Answer: 12 dollars\n\nQuestion: what is 2+2?", "#### 12"),
    ("####18", "#### 18"),
    ("1.5.3", "#### 153"),
]


def lm_eval_task(data_dir: Path, cache_dir: Path | None = None):
    """lm-eval's gsm8k task with its data read from data_dir/{train,test}.jsonl."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval.tasks
    import yaml
    from lm_eval.api.task import ConfigurableTask

    config = yaml.safe_load(
        (Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml").read_text()
    )
    config.pop("tag", None)
    files = {s: str(data_dir / f"{s}.jsonl") for s in ("train", "test")}
    kwargs = {"data_files": files} | ({"cache_dir": str(cache_dir)} if cache_dir else {})
    config.update(dataset_path="json", dataset_name=None, dataset_kwargs=kwargs)
    return ConfigurableTask(config=config)


def lm_eval_prompts(data_dir: Path, limit: int | None, seed: int = 1234, cache_dir=None):
    """(prompt, generation kwargs) for the first `limit` test documents, as lm-eval builds them."""
    task = lm_eval_task(data_dir, cache_dir)
    task.set_fewshot_seed(seed)  # what simple_evaluate does with its default fewshot seed
    task.build_all_requests(limit=limit)
    return [inst.arguments for inst in sorted(task.instances, key=lambda i: i.doc_id)]


def lm_eval_scores(responses=RESPONSES):
    """Run lm-eval's filters and metric over (response, reference answer) pairs."""
    with tempfile.TemporaryDirectory() as tmp:
        rows = [{"question": f"q{i}", "answer": ans} for i, (_, ans) in enumerate(responses)]
        text = "".join(json.dumps(r) + "\n" for r in rows)
        for split in ("train", "test"):
            Path(tmp, f"{split}.jsonl").write_text(text)
        task = lm_eval_task(Path(tmp), Path(tmp, "cache"))
        task.set_fewshot_seed(1234)
        task.build_all_requests()
        instances = sorted(task.instances, key=lambda i: i.doc_id)
        for inst, (resp, _) in zip(instances, responses):
            inst.resps.append(resp)
        task.apply_filters()
        out = []
        for inst, (resp, ans) in zip(instances, responses):
            row = {"response": resp, "answer": ans}
            for key, name in (("strict-match", "strict"), ("flexible-extract", "flexible")):
                row[name] = inst.filtered_resps[key]
                result = task.process_results(inst.doc, [row[name]])
                row[f"exact_match_{name}"] = result["exact_match"]
            out.append(row)
        return out


def fewshot_indices(prompt: str, train: list[dict]) -> list[int]:
    found = []
    for j, row in enumerate(train):
        pos = prompt.find(f"Question: {row['question']}\nAnswer: {row['answer']}\n\n")
        if pos >= 0:
            found.append((pos, j))
    return [j for _, j in sorted(found)]


def record(data_dir: Path, limit: int | None, until: list) -> list[dict]:
    train = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    out = []
    for prompt, kwargs in lm_eval_prompts(data_dir, limit):
        assert kwargs["until"] == until, kwargs
        sha = hashlib.sha256(prompt.encode()).hexdigest()
        out.append({"fewshot": fewshot_indices(prompt, train), "sha256": sha})
    return out


def main() -> None:
    import lm_eval

    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is missing; the golden file records prompts of the full data set")
    until = lm_eval_prompts(MINI, 1)[0][1]["until"]
    golden = {
        "lm_eval": lm_eval.__version__,
        "until": until,
        "mini": record(MINI, None, until),
        "shared": record(SHARED, N_SHARED, until),
        "responses": lm_eval_scores(),
    }
    # One record per line keeps the file small and its diffs readable.
    lines = [f"{json.dumps(key)}: {json.dumps(golden[key])}" for key in ("lm_eval", "until")]
    for key in ("mini", "shared", "responses"):
        rows = ",\n  ".join(json.dumps(r) for r in golden[key])
        lines.append(f"{json.dumps(key)}: [\n  {rows}\n ]")
    GOLDEN.write_text("{\n " + ",\n ".join(lines) + "\n}\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
