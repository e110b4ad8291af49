import sys

from deit_train.run.console import quiet_console
from deit_train.run.environment import freeze_imported_objects
from deit_train.run.launch import rank_overrides
from deit_train.search import register_sweeper
from deit_train.train import main as train_main


def main() -> None:
    """The training command line: ``python -m deit_train`` or ``deit-train``."""
    freeze_imported_objects()
    sys.argv += rank_overrides()
    quiet_console()  # here too: a sweep's driver process (submitit) never enters train's main()
    register_sweeper()
    train_main()


if __name__ == "__main__":
    main()
