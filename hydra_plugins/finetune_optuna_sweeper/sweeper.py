"""The Hydra plugin class: ``hydra/sweeper=finetune_optuna`` (settings: ``config.OptunaSweeperConf``).

Hydra's plugin scan imports this module on every start of every Hydra app, so it imports neither
optuna (an extra) nor torch: the sweep itself is ``_sweep.StudySweep``, imported when a study runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import CompactHydraException
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf


class SweepError(CompactHydraException):
    """A study that cannot run as configured: Hydra prints this one line, no traceback."""

    def __init__(self, message: str):
        super().__init__(f"error: {message}")


class OptunaSweeper(Sweeper):
    def __init__(self, *, direction: str | None, n_trials: int, n_jobs: int, study_name: str,
                 storage: str | None, heartbeat_s: int, sampler: Any, pruner: Any, params: Any) -> None:
        if n_trials < 0 or n_jobs < 1:
            raise SweepError(f"hydra.sweeper: n_trials must be >= 0 and n_jobs >= 1, got {n_trials} and {n_jobs}")
        if heartbeat_s < 2:
            raise SweepError(f"hydra.sweeper.heartbeat_s must be at least 2 (seconds), got {heartbeat_s}")
        self.settings = {"direction": direction, "n_trials": n_trials, "n_jobs": n_jobs, "study_name": study_name,
                         "storage": storage, "heartbeat_s": heartbeat_s, "sampler": to_plain(sampler),
                         "pruner": to_plain(pruner), "params": to_plain(params) or {}}

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        try:
            from hydra_plugins.finetune_optuna_sweeper._sweep import StudySweep
        except ModuleNotFoundError as err:
            raise SweepError(f"hydra/sweeper=finetune_optuna needs {err.name}: "
                             "pip install 'finetune[optuna]'") from None
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)
        self.study_sweep = StudySweep(config=config, hydra_context=hydra_context, launcher=self.launcher,
                                      **self.settings)

    def sweep(self, arguments: list[str]) -> list[Sequence[JobReturn]]:
        return self.study_sweep.sweep(arguments)


def to_plain(node: Any) -> Any:
    """A config node as plain dicts and lists, interpolations (``${seed}``) resolved."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
