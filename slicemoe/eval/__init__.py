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
    # Raises ValueError naming eval.data_path unless the local data the task reads is there.
    check_data: Callable[[str], Any] | None = None


TASKS: dict[str, Task] = {}


def load_hub(hub_id: tuple[str, str], hint: str, **kw):
    """A dataset from the HF hub, for when eval.data_path is not set (needs `datasets` and a
    network); every failure says how to point eval.data_path at local data instead."""
    try:
        import datasets
    except ImportError:
        raise ValueError(
            f"eval.data_path is not set and `datasets` is not installed: {hint}"
        ) from None
    try:
        return datasets.load_dataset(*hub_id, **kw)
    except Exception as e:
        raise ValueError(
            f"eval.data_path is not set and loading {hub_id[0]} failed ({e}): {hint}"
        ) from e


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
