#!/usr/bin/env python
"""Compare runs: `python scripts/compare_runs.py outputs/quickstart` (local run dirs, CSV or offline W&B) or
`python scripts/compare_runs.py --wandb ENTITY/PROJECT --group quickstart` (W&B API). See deit_train.compare."""
import sys

from deit_train.compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
