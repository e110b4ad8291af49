"""A search trial's side of the study: each validated epoch's metric reported to the study, and the run stopped
when the study's pruner prunes it.

Written here rather than taken from optuna-integration's ``PyTorchLightningPruningCallback``: that one raises
``TrialPruned`` inside ``fit`` outside DDP (the run then ends without its test and ``results.json``) and needs the
driver's ``Trial`` object. Here the run looks its trial up in the shared storage (so a Slurm job reports like an
in-process one), global rank 0 alone talks to the study and broadcasts the decision, and a pruned run stops at the
end of the epoch like a finished one: it keeps its run directory, tests its best checkpoint and records
``search/pruned_at_epoch``; the driver then marks the trial pruned.
"""
from __future__ import annotations

import logging

import lightning as L
import optuna
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from deit_train.search.study import PRUNED_AT, RUN_DIR, find_trial, open_storage

log = logging.getLogger(__name__)


class StudyPruning(Callback):
    def __init__(self, storage: str, study_name: str, trial: int, monitor: str, pruner: optuna.pruners.BasePruner,
                 run_dir: str) -> None:
        self.storage_url, self.study_name, self.number = storage, study_name, int(trial)
        self.monitor, self.pruner, self.run_dir = monitor, pruner, run_dir
        self.trial: optuna.Trial | None = None
        self.pruned_at: int | None = None

    @classmethod
    def from_run_config(cls, cfg: DictConfig) -> "StudyPruning":
        """The callback of a search trial (``optuna_trial``, set by the sweeper): the study from the sweeper's
        config, which every job of a multirun carries."""
        sweeper = HydraConfig.get().sweeper
        pruner = instantiate(sweeper.pruner) if sweeper.get("pruner") else optuna.pruners.NopPruner()
        return cls(sweeper.storage, sweeper.study_name, cfg.optuna_trial, sweeper.get("pruning_metric") or "val/top1",
                   pruner, str(cfg.paths.output_dir))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or self.trial is not None:
            return
        study = optuna.load_study(study_name=self.study_name, storage=open_storage(self.storage_url),
                                  pruner=self.pruner)
        self.trial = optuna.Trial(study, find_trial(study, self.number)._trial_id)
        self.trial.set_user_attr(RUN_DIR, self.run_dir)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            epoch = trainer.current_epoch
            reported = find_trial(self.trial.study, self.number).intermediate_values
            if epoch not in reported:  # a resumed trial does not report its earlier epochs again
                self.trial.report(float(trainer.callback_metrics[self.monitor]), epoch)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune, src=0):  # every rank stops at the same epoch
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True
            if trainer.is_global_zero and self.trial is not None:
                self.trial.set_user_attr(PRUNED_AT, self.pruned_at)
                log.info("trial %d pruned after epoch %d (%s %.4f)", self.number, self.pruned_at, self.monitor,
                         float(trainer.callback_metrics[self.monitor]))

    def run_results(self) -> dict:
        """Into ``results.json``: the trial number, and the epoch it was pruned at."""
        results = {"search/trial": self.number}
        if self.pruned_at is not None:
            results["search/pruned_at_epoch"] = self.pruned_at
        return results
