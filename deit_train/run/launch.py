"""Per-process Hydra settings when Slurm's ``srun`` starts one ``python -m deit_train`` per device."""
from __future__ import annotations

import os
from collections.abc import Mapping


def rank_overrides(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Hydra overrides for every process but global rank 0 of a multi-task ``srun`` launch.

    All ranks share one run directory; rank 0 alone writes the run config (``.hydra/``) and the log file, the
    others log to stdout (which Slurm collects). Lightning's own launcher does the same for the processes it starts.
    """
    rank, tasks = environ.get("SLURM_PROCID"), environ.get("SLURM_NTASKS", "1")
    if rank in (None, "0") or not tasks.isdigit() or int(tasks) < 2:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
