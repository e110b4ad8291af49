"""The search loop behind ``hydra/sweeper=optuna`` (``hydra_plugins.deit_train_optuna_sweeper``): ask Optuna for
``n_jobs`` trials at a time, hand them to the configured launcher (in-process, or Slurm jobs through submitit) as
override lists, and tell the study what each returned.

Before any trial trains: the space, the objective, the pruning metric and the storage are checked (one line, exit 2).
Running the same command again continues the study: its finished, pruned and failed trials count towards
``n_trials``, and a trial a killed search left running is launched again with its parameters in its run directory
(where it resumes from its checkpoint). The sampler is rebuilt before each trial with the study's recorded seed plus
the trial number, so a search proposes the same parameters in the same order whether it ran at once or was
restarted.
"""
from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import optuna
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.trial import TrialState

from deit_train.errors import ConfigError, one_line_errors
from deit_train.run.loggers import kept_overrides
from deit_train.search.objective import check_metrics
from deit_train.search.report import finish_report
from deit_train.search.space import check_paths, parse_space, space_identity, trial_overrides
from deit_train.search.study import (DRIVER, FINISHED, PLAIN_RUN, PRUNED_AT, RUN_DIR, abandoned, driver_id, find_trial,
                                     open_storage, open_study, set_trial_attr)

log = logging.getLogger("deit_train")


class OptunaSearch:
    """The sweeper's work (the plugin class in ``hydra_plugins`` only forwards to it, so that Hydra's plugin scan at
    every start imports neither Optuna nor torch)."""

    def __init__(self, sampler: Any, direction: str, storage: str | None, study_name: str | None, n_trials: int,
                 n_jobs: int, max_failure_rate: float = 0.0, pruner: Any = None, pruning_metric: str | None = None,
                 params: DictConfig | None = None) -> None:
        self.sampler, self.direction, self.storage_url, self.study_name = sampler, direction, storage, study_name
        self.n_trials, self.n_jobs, self.max_failure_rate = int(n_trials), int(n_jobs), float(max_failure_rate)
        self.pruning_metric = pruning_metric if pruner is not None else None
        self.params = params
        self.config: DictConfig | None = None
        self.launcher = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(config=config, hydra_context=hydra_context,
                                                                task_function=task_function)

    def sweep(self, arguments: list[str]) -> list[JobReturn]:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # our lines say what happens, once
        with one_line_errors():
            study, space, fixed = self._prepare(arguments)
        with one_line_errors():  # too many failed trials
            returns = self._run(study, space, fixed)
        finish_report(study, Path(self.config.hydra.sweep.dir))
        return returns

    # ---- before any trial trains -------------------------------------------------------------------------------
    def _prepare(self, arguments: list[str]) -> tuple[optuna.Study, dict, list[str]]:
        if self.n_trials < 1 or self.n_jobs < 1:
            raise ConfigError(f"hydra.sweeper.n_trials={self.n_trials}, n_jobs={self.n_jobs}: both must be >= 1")
        if not self.storage_url or not self.study_name:
            raise ConfigError("hydra.sweeper.storage and hydra.sweeper.study_name must be set: the trials report "
                              "to the study through its storage (e.g. sqlite:///<sweep dir>/optuna.db)")
        space, fixed = parse_space(self.params, arguments)
        if not space:
            raise ConfigError("hydra.sweeper.params has no search range: give at least one, e.g. "
                              "distill.alpha: interval(0.1, 0.9)")
        check_paths(space, self.config)
        check_metrics(self.config, self.config.get("optimized_metric"), self.pruning_metric)
        # what the trials train: another space, objective or setting is another study (not where runs are stored
        # or how they are shown)
        trained = [o for o in fixed if o.startswith("experiment=") or kept_overrides([o])]
        identity = {"space": space_identity(space), "objective": self.config.get("optimized_metric"),
                    "overrides": sorted(trained)}
        study = open_study(open_storage(self.storage_url), self.study_name, self.direction, identity,
                           self._configured_seed())
        study.set_user_attr(PLAIN_RUN, self._plain_run_overrides(fixed))
        return study, space, fixed

    def _plain_run_overrides(self, fixed: list[str]) -> list[str]:
        """The overrides of a plain run (no search) that trains what a trial trains, less its parameters: the
        command line's, and the config groups the ``hparams_search`` config chose (e.g. ``distill=soft``)."""
        plain = [o for o in fixed if not o.startswith(("hparams_search=", "hydra."))]
        choices = hydra.compose(config_name="train", overrides=plain, return_hydra_config=True).hydra.runtime.choices
        chosen = self.config.hydra.runtime.choices
        return [*plain, *(f"{group}={choice}" for group, choice in chosen.items()
                          if not group.startswith("hydra") and group != "hparams_search"
                          and choices.get(group) != choice)]

    def _configured_seed(self) -> int | None:
        keywords = self.sampler.keywords if isinstance(self.sampler, functools.partial) else {}
        return keywords.get("seed")

    # ---- the trials ----------------------------------------------------------------------------------------------
    def _run(self, study: optuna.Study, space: dict, fixed: list[str]) -> list[JobReturn]:
        trials = study.get_trials(deepcopy=False)
        finished = [t for t in trials if t.state in FINISHED]
        running = [t for t in trials if t.state == TrialState.RUNNING]
        resumed = [t.number for t in running if abandoned(t)]
        elsewhere = len(running) - len(resumed)
        to_go = max(0, self.n_trials - len(finished) - elsewhere)
        log.info("study %s (%s): %d finished (%s), %d running elsewhere, %d to run%s", study.study_name,
                 self.storage_url, len(finished), _state_counts(finished), elsewhere, to_go,
                 f", of them trials {resumed[:to_go]} again (left running by a stopped search)" if resumed else "")
        queue, returns, failures = resumed[:to_go], [], 0
        while to_go > 0:
            batch = queue[:self.n_jobs]
            queue = queue[len(batch):]
            batch += [self._ask(study, space) for _ in range(min(self.n_jobs, to_go) - len(batch))]
            batch_returns = self._launch(study, batch, fixed)
            for number, ret in zip(batch, batch_returns):
                failures += self._tell(study, number, ret)
            returns += batch_returns
            to_go -= len(batch)
            if failures and failures / len(returns) > self.max_failure_rate:
                crashed = next((r for r in reversed(returns) if r.status == JobStatus.FAILED), None)
                if crashed is not None:
                    crashed.return_value  # noqa: B018 -- re-raises the trial's exception, traceback and all
                raise ConfigError(f"{failures} of {len(returns)} trials failed (hydra.sweeper.max_failure_rate="
                                  f"{self.max_failure_rate}): see their run directories")
        return returns

    def _ask(self, study: optuna.Study, space: dict) -> int:
        seed = int(study.user_attrs["sampler_seed"]) + len(study.get_trials(deepcopy=False))
        study.sampler = self.sampler(seed=seed) if isinstance(self.sampler, functools.partial) else self.sampler
        trial = study.ask(fixed_distributions=space)
        trial.set_user_attr(DRIVER, driver_id())
        return trial.number

    def _launch(self, study: optuna.Study, numbers: list[int], fixed: list[str]) -> list[JobReturn]:
        """The trials ``numbers`` as jobs of the launcher, each in ``<sweep dir>/<trial number>`` (Hydra's job
        number; consecutive numbers go in one launch, as one Slurm array)."""
        returns: list[JobReturn] = []
        for run in _consecutive(numbers):
            overrides = []
            for number in run:
                trial = find_trial(study, number)
                if trial.user_attrs.get(DRIVER) != driver_id():  # launched again by this search
                    set_trial_attr(study, number, DRIVER, driver_id())
                overrides.append([*fixed, *trial_overrides(trial.params), f"++optuna_trial={number}"])
                log.info("trial %d: %s", number, " ".join(trial_overrides(trial.params)))
            returns += self.launcher.launch(overrides, initial_job_idx=run[0])
        return returns

    def _tell(self, study: optuna.Study, number: int, ret: JobReturn) -> int:
        """Tell the study how trial ``number`` ended; 1 when it failed."""
        trial = find_trial(study, number)
        if RUN_DIR not in trial.user_attrs and ret.hydra_cfg is not None:  # it failed before its callback started
            set_trial_attr(study, number, RUN_DIR, str(ret.hydra_cfg.hydra.runtime.output_dir))
        if ret.status == JobStatus.FAILED:
            log.warning("trial %d failed: %s", number, (str(ret._return_value).strip().splitlines() or ["?"])[0])
            study.tell(number, state=TrialState.FAIL)
            return 1
        if PRUNED_AT in trial.user_attrs:
            study.tell(number, state=TrialState.PRUNED)
            log.info("trial %d pruned at epoch %d", number, trial.user_attrs[PRUNED_AT])
            return 0
        if not _is_number(ret):
            log.warning("trial %d returned %r, not a number: failed", number, ret.return_value)
            study.tell(number, state=TrialState.FAIL)
            return 1
        study.tell(number, float(ret.return_value))
        log.info("trial %d: %s = %.6g", number, study.user_attrs["search_identity"]["objective"], ret.return_value)
        return 0


def _is_number(ret: JobReturn) -> bool:
    value = ret._return_value
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _state_counts(trials: Sequence[optuna.trial.FrozenTrial]) -> str:
    counts = {state.name.lower(): sum(t.state == state for t in trials) for state in FINISHED}
    return ", ".join(f"{n} {name}" for name, n in counts.items())


def _consecutive(numbers: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][-1] + 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    return runs
