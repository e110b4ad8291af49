"""The machine a run starts on: CPU threads as Slurm granted them, and whether the asked-for accelerator exists."""
from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping

import torch

from deit_train.errors import ConfigError

log = logging.getLogger(__name__)


def threads_from_slurm(environ: MutableMapping[str, str] = os.environ) -> int | None:
    """Inside a Slurm job, torch and OpenMP use the CPUs granted per task (``SLURM_CPUS_PER_TASK``).

    Without this, torch starts one thread per core of the node whatever Slurm granted, and jobs sharing a node
    oversubscribe its cores. ``OMP_NUM_THREADS`` is set too, for DataLoader workers and child processes; an
    explicit ``OMP_NUM_THREADS`` is kept. Returns the thread count set, or None outside Slurm.
    """
    granted = environ.get("SLURM_CPUS_PER_TASK", "")
    if not granted.isdigit() or int(granted) < 1:
        return None
    explicit = environ.get("OMP_NUM_THREADS", "")
    threads = int(explicit) if explicit.isdigit() and int(explicit) > 0 else int(granted)
    environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    log.info("Slurm granted %s CPUs per task: torch uses %d threads (OMP_NUM_THREADS=%d)", granted, threads, threads)
    return threads


def check_accelerator(accelerator: str) -> None:
    """One line instead of Lightning's ``MisconfigurationException`` when a GPU run finds no GPU."""
    wanted = str(accelerator).lower()
    if wanted == "cuda" or (wanted == "gpu" and not torch.backends.mps.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator={accelerator} but no GPU is visible (torch.cuda.is_available() "
                              "is false): run on CPU with trainer=cpu")
