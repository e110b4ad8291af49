"""Which checkpoint a run resumes from: preemption-safe restarts in the same run directory.

A Slurm job that is preempted, hits its time limit or is requeued (``scontrol requeue``) starts again with the
same command and the same run directory. It continues from the newest of

- ``<checkpoint dir>/last.ckpt``: written after every epoch (``configs/callbacks/last_checkpoint.yaml``);
- ``<default_root_dir>/hpc_ckpt_<n>.ckpt``: written by Lightning's SLURM auto-requeue handler when the job gets
  ``SIGUSR1`` shortly before its time limit (``#SBATCH --signal=SIGUSR1@90``).

Lightning alone only looks for the second kind (and always prefers it, even when an older one sits beside a newer
``last.ckpt``); a requeue without warning signal only leaves the first.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)


def resume_checkpoint(trainer: L.Trainer, ckpt_path: str | None) -> str | None:
    """``ckpt_path`` when given, else the newest last/HPC checkpoint of this run directory, else ``None``."""
    if ckpt_path:
        return str(ckpt_path)
    candidates = [Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
                  for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    candidates += Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
    existing = [path for path in candidates if path.is_file()]
    if not existing:
        return None
    newest = max(existing, key=lambda path: path.stat().st_mtime)
    log.info("resuming from %s (newest checkpoint in the run directory; ckpt_path=... picks another)", newest)
    return str(newest)
