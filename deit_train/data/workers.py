"""How many loader workers a rank gets by default: the CPUs granted to its task, shared by the ranks in that task."""
from __future__ import annotations

import math
import os
from collections.abc import Mapping


def granted_cpus(environ: Mapping[str, str] = os.environ) -> int:
    """CPUs this task may use: ``SLURM_CPUS_PER_TASK`` inside a Slurm job, else this process's affinity mask
    (what ``taskset``, cgroups or a container granted -- not the node's core count)."""
    granted = environ.get("SLURM_CPUS_PER_TASK", "")
    if granted.isdigit() and int(granted) > 0:
        return int(granted)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def ranks_per_task(local_ranks: int, environ: Mapping[str, str] = os.environ) -> int:
    """Training processes sharing one task's CPUs: Slurm's ``--ntasks-per-node`` gives each rank its own task
    (``slurm/train.sbatch``); a single task (or torchrun, or Lightning's own launcher) holds every local rank."""
    tasks = environ.get("SLURM_NTASKS_PER_NODE", "")
    tasks_per_node = int(tasks) if tasks.isdigit() and int(tasks) > 0 else 1
    return max(1, math.ceil(local_ranks / tasks_per_node))


def default_num_workers(local_ranks: int, environ: Mapping[str, str] = os.environ) -> int:
    """``data.num_workers=null``: this rank's share of the task's CPUs, at least one worker."""
    return max(1, granted_cpus(environ) // ranks_per_task(local_ranks, environ))
