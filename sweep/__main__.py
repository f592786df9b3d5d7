"""`python -m sweep` / `slicemoe-sweep`: see sweep.app."""

import signal
import sys

from sweep.app import check_command_line
from sweep.app import main as _hydra_main
from sweep.errors import stops

_terminated = False


def terminate(signum, frame):
    """SIGTERM, handled as Ctrl-C is: the runs in flight are closed on the way out. Remembered
    apart, as Ray may re-raise the interrupt as a plain KeyboardInterrupt."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def main() -> None:
    # Ctrl-C or SIGTERM: the runs in flight are marked KILLED on the way out and the same
    # command carries on; one line says so, instead of a traceback through Hydra and Ray.
    signal.signal(signal.SIGTERM, terminate)
    with stops():
        check_command_line(sys.argv[1:])
    try:
        _hydra_main()
    except KeyboardInterrupt:
        print(
            "interrupted: runs in flight marked KILLED; the same command continues", file=sys.stderr
        )
        sys.exit(143 if _terminated else 130)


if __name__ == "__main__":
    main()
