"""The error that names a config field, and the check of numeric fields against their ranges.

Apart from slicemoe.validate, which imports the model and cache code (torch, transformers), so
that a sweep's driver checks its own settings without them (sweep.schema).
"""

from __future__ import annotations

import math
from operator import attrgetter

INF = math.inf


class ConfigError(ValueError):
    """A config value that cannot work; `field` is its dotted name."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


def check_bounds(cfg, bounds) -> None:
    """`bounds`: (field, lowest, highest, whether the lowest itself is excluded) each. Values must
    be finite, so NaN and inf are refused too; a null optional is not checked."""
    for name, low, high, open_low in bounds:
        value = attrgetter(name)(cfg)
        if value is None or (
            math.isfinite(value) and (low < value if open_low else low <= value) and value <= high
        ):
            continue
        span = f"{'(' if open_low else '['}{_number(low)}, {_number(high)}{')' if high == INF else ']'}"
        raise ConfigError(name, f"{value} is out of range; use a finite number in {span}")


def _number(x: float) -> str:
    """A bound as written: 4294967295, not 4.29497e+09."""
    return str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"
