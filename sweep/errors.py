"""The one exception the sweep raises for problems the user has to fix."""

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from hydra.errors import CompactHydraException


class SweepError(CompactHydraException):
    """The message names the offending config key and how to fix it; `stops` prints it alone
    (no traceback) and ends the process with 1.
    """


@contextmanager
def stops() -> Iterator[None]:
    """Around what Hydra calls (the task, the launcher, the sweeper): a SweepError ends the
    process with its message alone. Left to Hydra, it would add a line about HYDRA_FULL_ERROR,
    and for a single run one naming the job's overrides."""
    try:
        yield
    except SweepError as err:
        print(err, file=sys.stderr)
        raise SystemExit(1) from None
