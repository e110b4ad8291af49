"""``python -m deit_train.compare``: the same command as ``scripts/compare_runs.py``."""
import sys

from deit_train.compare.cli import main

if __name__ == "__main__":
    sys.exit(main())
