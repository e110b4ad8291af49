"""The process and machine a run starts on: its imported objects set aside from the garbage collector, CPU threads
as Slurm granted them, and whether the asked-for accelerator exists."""
from __future__ import annotations

import gc
import logging
import os
from collections.abc import MutableMapping

import torch

from deit_train.errors import ConfigError

log = logging.getLogger(__name__)


def freeze_imported_objects() -> None:
    """Move the objects alive now (the imports: ~600k of torch, Lightning, timm, Hydra) out of the garbage
    collector's reach, once per process, at the start of a command.

    They live until the process exits, yet each full collection walks them all and the interpreter's exit walks them
    again: 1.8 s of a 9.6 s digits run on one core (``scripts/benchmark_startup.py``). Frozen, forked DataLoader
    workers also leave their pages shared (the collector writes to what it walks); Python's gc documentation
    recommends ``gc.freeze()`` in a parent that forks for that reason. Once only: a later call (a command run inside
    another, tests) would also freeze what the earlier one left behind.
    """
    if gc.get_freeze_count() == 0:
        gc.freeze()


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
