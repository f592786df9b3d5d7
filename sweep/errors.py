"""The one exception the sweep raises for problems the user has to fix."""

from hydra.errors import CompactHydraException


class SweepError(CompactHydraException):
    """Printed by Hydra as its message alone (no traceback), then the process exits with 1.

    The message names the offending config key and how to fix it.
    """
