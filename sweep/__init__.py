"""Sweep engine: a Hydra app whose multiruns execute on Ray actors and are tracked in MLflow.

`python -m sweep` runs one run in-process; `python -m sweep -m key=a,b ...` fans the runs out to
long-lived Ray actors (see `sweep.launcher`). `slicemoe` never imports this package.
"""
