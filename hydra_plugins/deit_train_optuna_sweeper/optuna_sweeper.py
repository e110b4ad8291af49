"""The Sweeper plugin class Hydra instantiates from ``hydra.sweeper._target_`` (configs/hydra/sweeper/optuna.yaml).

Hydra imports this module at every start while scanning for plugins: it imports neither Optuna nor torch; the
search itself is :class:`deit_train.search.sweeper.OptunaSearch`.
"""
from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """Hydra's Sweeper interface over :class:`~deit_train.search.sweeper.OptunaSearch` (the published
    hydra-optuna-sweeper's key names: n_trials, n_jobs, direction, storage, study_name, sampler, params)."""

    def __init__(self, **options: Any) -> None:
        from deit_train.search.sweeper import OptunaSearch

        self.search = OptunaSearch(**options)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.launcher = self.search.launcher

    def sweep(self, arguments: list[str]) -> Any:
        return self.search.sweep(arguments)
