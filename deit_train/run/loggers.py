"""Experiment tracking: a CSV logger that survives requeues, the W&B logger with automatic offline mode, and the
run config every logger records.

The W&B API key is read from ``WANDB_API_KEY`` only (by wandb itself); nothing here writes it anywhere.
"""
from __future__ import annotations

import csv
import logging
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Overrides that say where or how verbosely a run goes, not what it trains: left out of the run name.
_NAME_IGNORED_PREFIXES = ("experiment=", "hydra.", "paths.", "logger", "ckpt_path=", "trainer.enable_progress_bar",
                          "callbacks")
_RUN_ID_FILE = "deit_train_run_id"


class _AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, except that it keeps the rows an earlier attempt of the run wrote.

    Lightning's deletes ``metrics.csv`` when it finds one; a resumed run (requeue, ``ckpt_path``) would lose
    the curves of the epochs before the interruption. Readers take the last row per epoch when an
    interrupted epoch was trained again.
    """

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` instead of replacing it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def log_run_config(loggers: Iterable[Logger], cfg: DictConfig) -> None:
    """Record the full resolved config (what actually ran) with every logger (CSV: ``hparams.yaml``)."""
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    for logger in loggers:
        logger.log_hyperparams(resolved)


def offline_reason(base_url: str | None = None, timeout_s: float = 3.0) -> str | None:
    """Why W&B cannot log online from here (no key in the environment, server unreachable), or ``None``."""
    if not os.environ.get("WANDB_API_KEY"):
        return "no WANDB_API_KEY in the environment"
    url = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{host}:{port} unreachable ({exc.__class__.__name__})"
    return None


def kept_overrides(overrides: Sequence[str]) -> list[str]:
    """The command-line overrides that change what is trained (not where it is stored or how it is shown)."""
    return [o for o in overrides if not o.lstrip("+~").startswith(_NAME_IGNORED_PREFIXES)]


def run_name(experiment: str, overrides: Sequence[str] = ()) -> str:
    """``<experiment>`` plus the command-line overrides that change what is trained, e.g. ``quickstart,distill=soft``."""
    return ",".join([experiment, *kept_overrides(overrides)])


def _run_id(save_dir: Path) -> str | None:
    """The W&B run id of this run directory, so a requeued/resumed job continues the same W&B run."""
    path = save_dir / "wandb" / _RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    if rank_zero_only.rank != 0:  # only rank 0 creates the W&B run
        return None
    run_id = uuid.uuid4().hex[:12]  # W&B ids: lowercase letters and digits
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id)
    return run_id


def wandb_logger(
    project: str,
    save_dir: str,
    experiment: str,
    overrides: Sequence[str] = (),
    entity: str | None = None,
    group: str | None = None,
    tags: Sequence[str | None] = (),
    name: str | None = None,
    log_model: bool | str = False,
    offline: bool | None = None,
    job_type: str = "train",
) -> WandbLogger:
    """A Lightning ``WandbLogger``; ``offline=None`` decides by itself (:func:`offline_reason`).

    Args:
        experiment, overrides: make the default run name (:func:`run_name`).
        tags: ``key=value`` strings; those whose value is empty/None (e.g. no teacher) are dropped.
        log_model: ``True`` uploads the checkpoints at the end, ``"all"`` whenever they are written.
    """
    save_path = Path(save_dir)
    if offline is None and os.environ.get("WANDB_MODE") is None:
        reason = offline_reason()
        offline = reason is not None
        if offline and rank_zero_only.rank == 0:
            log.info("wandb: logging offline (%s); upload later with `wandb sync %s/wandb/offline-run-*`",
                     reason, save_path)
    if offline and log_model:  # Lightning refuses the combination: artifacts need the server
        log.info("wandb: offline, so checkpoints are not logged as artifacts (logger.wandb.log_model ignored)")
        log_model = False
    kept_tags = [t for t in tags if t and str(t).split("=", 1)[-1] not in ("", "None", "null")]
    return WandbLogger(
        project=project,
        entity=entity,
        group=group or experiment,
        tags=kept_tags,
        name=name or run_name(experiment, list(overrides)),
        save_dir=str(save_path),
        offline=bool(offline),
        log_model=log_model,
        job_type=job_type,
        id=_run_id(save_path),
        resume="allow",
    )
