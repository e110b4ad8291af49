"""Compare training runs: final/best val top-1 per head, teacher top-1, parameters, throughput, wall time, the config
keys in which the runs differ, and the val top-1 curves as a PNG.

The command line: ``scripts/compare_runs.py`` or ``python -m deit_train.compare``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deit_train.compare.plots import plot_curves, plot_groups
from deit_train.compare.runs import find_runs, load_wandb_online
from deit_train.compare.statistics import find_baselines, group_runs
from deit_train.compare.tables import print_comparison, print_disagreement, print_group_comparison
from deit_train.errors import ConfigError
from deit_train.run.environment import freeze_imported_objects

DEFAULT_RUN_FOLDERS = (Path("outputs"), Path("multirun"))


def main(argv: list[str] | None = None) -> int:
    freeze_imported_objects()
    parser = argparse.ArgumentParser(
        prog="compare_runs.py", description=__doc__.split("\n\n")[0],
        epilog="examples: compare_runs.py outputs/quickstart | compare_runs.py outputs/a outputs/b --out cmp.png | "
               "compare_runs.py --wandb my-team/deit_train --group quickstart")
    parser.add_argument("runs", nargs="*", type=Path, help="run dirs, sweep dirs or output folders (searched; "
                        "default: ./outputs and ./multirun)")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read runs from the W&B API instead")
    parser.add_argument("--group", help="with --wandb: only this group (= experiment)")
    parser.add_argument("--source", choices=("auto", "csv", "wandb"), default="auto",
                        help="local runs: CSV logs, offline W&B files, or auto (CSV when present)")
    parser.add_argument("--out", type=Path, default=Path("compare_runs.png"), help="PNG of the val top-1 curves")
    parser.add_argument("--group-by", metavar="KEY[,KEY]",
                        help="config keys that form the groups (default: runs differing only in seed form one)")
    parser.add_argument("--baseline", metavar="KEY=VALUE",
                        help="the group the others are tested against (Welch t-test), e.g. distill=none")
    args = parser.parse_args(argv)
    if not args.runs and not args.wandb:  # where Hydra puts runs and sweeps when run from here
        args.runs = [p for p in DEFAULT_RUN_FOLDERS if p.is_dir()] or list(DEFAULT_RUN_FOLDERS)
    runs = load_wandb_online(args.wandb, args.group) if args.wandb else []
    runs += find_runs(args.runs, args.source)
    if not runs:
        print(f"error: no runs found in {' '.join(map(str, args.runs)) or args.wandb} (a run has csv/metrics.csv "
              "or wandb/offline-run-*)", file=sys.stderr)
        return 2
    print_comparison(runs)
    print(f"curves: {plot_curves(runs, args.out)}")
    groups = group_runs(runs, args.group_by.split(",") if args.group_by else None)
    print_disagreement(groups)
    if args.group_by or args.baseline or any(len(g.runs) > 1 for g in groups):
        try:
            baselines = find_baselines(groups, args.baseline) if args.baseline else None
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print_group_comparison(groups, baselines)
        print(f"groups: {plot_groups(groups, args.out.with_name(f'{args.out.stem}_groups.png'))}")
    return 0
