"""Evaluation tasks, registered by name.

Two kinds of task share one narrow interface:
- "generate": `docs(cfg, tokenizer)` -> list[Doc]; the run generates greedily from `doc.prompt`
  until a stop string or `cfg.max_new_tokens`, then `score(doc, text)` -> {"accuracy": 0/1, ...}.
- "loglik": `windows(cfg, tokenizer)` -> list[Window]; the run sums next-token NLL over the
  scored positions and reports perplexity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Small texts shipped with the package, so that presets run on a fresh clone (data/README.md).
DATA = Path(__file__).resolve().parent / "data"


@dataclass
class Doc:
    prompt: str
    target: str  # the reference answer (already extracted, e.g. "42")
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Window:
    input_ids: list[int]
    n_context: int  # the first n_context tokens are context only; the rest are scored


@dataclass
class Task:
    name: str
    kind: str  # "generate" | "loglik"
    docs: Callable[..., list[Doc]] | None = None
    score: Callable[[Doc, str], dict[str, float]] | None = None
    stop: tuple[str, ...] = ()
    windows: Callable[..., list[Window]] | None = None
    # For a task that reads local data: raises ValueError naming eval.data_path and what to
    # pass unless that data is there (None: not set). Data never comes from the network, so a
    # launch refuses a missing path at once (slicemoe.validate).
    check_data: Callable[[str], Any] | None = None


TASKS: dict[str, Task] = {}


def shipped(name: str) -> str:
    """The path of a text shipped in slicemoe/eval/data (`${slicemoe.data:NAME}` in configs)."""
    path = DATA / name
    if not path.is_file():
        have = sorted(p.name for p in DATA.glob("*.txt"))
        raise ValueError(f"slicemoe/eval/data has no {name!r}; it ships {', '.join(have)}")
    return str(path)


def register(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    # Import the task modules lazily so that `slicemoe.eval` stays cheap to import.
    from slicemoe.eval import arith, gsm8k, wikitext  # noqa: F401

    if name not in TASKS:
        raise ValueError(f"eval.task={name!r} is unknown; choose one of {sorted(TASKS)}")
    return TASKS[name]
