"""The union-of-grids sweeper, registered with Hydra as `hydra/sweeper=slicemoe_grids`.

Hydra only instantiates sweepers whose class is defined under the `hydra_plugins` package, so
this is the thin Hydra-facing class; what it enumerates is `sweep.grids.expand`. Jobs, parsing,
batching and the launch loop are the basic sweeper's.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules without registering
# them in sys.modules, and dataclasses then cannot resolve string annotations.
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override

from sweep.errors import stops
from sweep.grids import expand, product


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.slicemoe_sweeper.slicemoe_sweeper.GridsSweeper"
    max_batch_size: Optional[int] = None
    # grid name -> {override key: comma-separated values}, as `params` of the basic sweeper.
    grids: dict[str, dict[str, Any]] = field(default_factory=dict)


ConfigStore.instance().store(
    group="hydra/sweeper", name="slicemoe_grids", node=GridsSweeperConf, provider="slicemoe"
)


class GridsSweeper(BasicSweeper):
    def __init__(self, grids: dict[str, dict[str, Any]], max_batch_size: Optional[int]) -> None:
        super().__init__(max_batch_size)
        self.grids = grids

    def split_arguments(
        self, overrides: list[Override], max_batch_size: Optional[int]
    ) -> list[list[list[str]]]:
        # `overrides` are the command line's (this sweeper has no `params`).
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        arguments = [o.input_line for o in overrides]

        with stops():
            jobs = expand(self.grids, arguments, partial(product, parser))
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))
