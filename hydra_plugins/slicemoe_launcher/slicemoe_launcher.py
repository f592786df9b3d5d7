"""The project's Ray launcher, registered with Hydra as `hydra/launcher=slicemoe_ray`.

Hydra only instantiates launchers whose class is defined under the `hydra_plugins` package, so
this is the thin Hydra-facing class; the work is in `sweep.launcher.Multirun`.
"""

# No `from __future__ import annotations`: Hydra executes plugin modules without registering
# them in sys.modules, and dataclasses then cannot resolve string annotations.
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from sweep.errors import stops
from sweep.launcher import Multirun


@dataclass
class SliceMoELauncherConf:
    # Ray and MLflow settings live in the app config (`ray.*`, `mlflow.*`, `sweep.*`) so that
    # single runs and multiruns read them from the same place.
    _target_: str = "hydra_plugins.slicemoe_launcher.slicemoe_launcher.SliceMoELauncher"


ConfigStore.instance().store(
    group="hydra/launcher", name="slicemoe_ray", node=SliceMoELauncherConf, provider="slicemoe"
)


class SliceMoELauncher(Launcher):
    def __init__(self) -> None:
        self.multirun: Optional[Multirun] = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        # The task function runs inside the actors (sweep.worker), never in this process.
        self.multirun = Multirun(config, hydra_context)

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        assert self.multirun is not None, "setup() first"
        with stops():
            return self.multirun.launch(job_overrides, initial_job_idx)
