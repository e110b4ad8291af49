"""Compare training runs: final/best val top-1 per head, teacher top-1, parameters, throughput, wall time, the config
keys in which the runs differ, and the val top-1 curves as a PNG.

Runs come from local run directories (``csv/metrics.csv``, ``csv/hparams.yaml``, ``results.json``), from offline
W&B runs (``<run dir>/wandb/offline-run-*/run-*.wandb``), or from the W&B API (``entity/project``, optionally one
group). One module per concern: ``runs`` (reading them), ``statistics`` (summary rows, groups, mean / CI / Welch),
``tables`` and ``plots`` (the report), ``cli`` (``scripts/compare_runs.py``, ``python -m deit_train.compare``).
"""
from deit_train.compare.cli import main
from deit_train.compare.plots import plot_curves, plot_groups
from deit_train.compare.runs import (Run, find_runs, load_local_run, load_wandb_offline, load_wandb_online,
                                     read_wandb_records)
from deit_train.compare.statistics import (RunGroup, Stats, config_differences, describe, find_baselines,
                                           group_runs, group_statistics, summary_rows, welch_p)
from deit_train.compare.tables import print_comparison, print_disagreement, print_group_comparison

__all__ = ["Run", "RunGroup", "Stats", "config_differences", "describe", "find_baselines", "find_runs", "group_runs",
           "group_statistics", "load_local_run", "load_wandb_offline", "load_wandb_online", "main", "plot_curves",
           "plot_groups", "print_comparison", "print_disagreement", "print_group_comparison", "read_wandb_records",
           "summary_rows", "welch_p"]
