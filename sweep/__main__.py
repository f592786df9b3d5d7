"""`python -m sweep` / `slicemoe-sweep`: see sweep.app."""

import sys

from sweep.app import main as _hydra_main


def main() -> None:
    # Ctrl-C: the runs in flight are marked KILLED on the way out and the same command carries
    # on; one line says so, instead of a traceback through Hydra and Ray.
    try:
        _hydra_main()
    except KeyboardInterrupt:
        print(
            "interrupted: runs in flight marked KILLED; the same command continues", file=sys.stderr
        )
        sys.exit(130)


if __name__ == "__main__":
    main()
