"""Which process of a multi-process launch this is, and its per-process Hydra settings when Slurm's ``srun``
starts one ``python -m deit_train`` per device."""
from __future__ import annotations

import os
from collections.abc import Mapping

# What each launcher sets in every process it starts: torchrun/Kubeflow (RANK), srun and submitit (SLURM_PROCID),
# Lightning's own launcher (LOCAL_RANK, NODE_RANK), LSF (JSM_NAMESPACE_RANK). Lightning reads the same names.
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "JSM_NAMESPACE_RANK")


def is_global_zero(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is global rank 0 of its launch (or the only process), known before any process group
    exists: every rank variable that is set is 0."""
    return all(environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def rank_overrides(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Hydra overrides for every process but global rank 0 of a multi-task ``srun`` launch.

    All ranks share one run directory; rank 0 alone writes the run record (``.hydra/``, see
    :class:`~deit_train.run.resume.KeepStoredRunConfig`) and the log file, the others log to stdout (which Slurm
    collects). Lightning's own launcher does the same for the processes it starts.
    """
    rank, tasks = environ.get("SLURM_PROCID"), environ.get("SLURM_NTASKS", "1")
    if rank in (None, "0") or not tasks.isdigit() or int(tasks) < 2:
        return []
    return ["hydra/job_logging=stdout"]
