"""A multirun that is a union of grids: what the `slicemoe_grids` Hydra sweeper enumerates.

Hydra's basic sweeper runs one cartesian product. The paper's figures need several (Figs. 8 and
9 sweep policies x cache sizes, Fig. 10 warmups at one cache size, Table 1 quantizers x bit
widths on a text), so a preset names its grids, each written like `hydra.sweeper.params`:

    hydra:
      sweeper:
        grids:
          fig10: {policy: dbsc, policy.warmup: "empty,pcw", cache: frac_25}
          table1: {eval: wikitext, bits: "mat42,mat84", policy: "lru_highbit,lru_lowbit"}

Grids are a mapping, so presets that each bring their own grids combine in a defaults list
(`+experiment=paper_all`). Every job of every grid gets the command line's overrides, which win
over a grid's value for the same key, as they win over `params` with the basic sweeper: that is
how `model=... model.path=...` reaches every part. A job two grids spell alike is listed once
(and the launcher runs a run key once, however it is spelled).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from sweep.errors import SweepError


def product(parser, lines: list[str]) -> list[list[str]]:
    """The basic sweeper's cartesian product of one list of override strings (`parser`: a
    Hydra OverridesParser)."""
    return BasicSweeper.split_arguments(parser.parse_overrides(lines), None)[0]


def value_string(value: Any) -> str:
    """A grid value as Hydra's override grammar reads it (YAML gives bools, numbers, null)."""
    return "null" if value is None else str(value)  # Hydra reads True/False in any case


def expand(
    grids: Mapping[str, Mapping[str, Any]],
    arguments: Sequence[str],
    product: Callable[[list[str]], list[list[str]]],
) -> list[list[str]]:
    """The jobs of every grid, in grid order, each once. `product(overrides)` is the basic
    sweeper's expansion of one list of override strings (grid first, then the command line)."""
    if not grids:
        raise SweepError(
            "hydra/sweeper=slicemoe_grids has no grids: set hydra.sweeper.grids (see sweep.grids)"
        )
    jobs: list[list[str]] = []
    seen: set[tuple[str, ...]] = set()
    for name, grid in grids.items():
        if not grid:
            raise SweepError(f"hydra.sweeper.grids.{name} is empty: give it key: values entries")
        own = [f"{key}={value_string(value)}" for key, value in grid.items()]
        for job in product([*own, *arguments]):
            if tuple(job) not in seen:
                seen.add(tuple(job))
                jobs.append(job)
    return jobs
