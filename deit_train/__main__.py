import sys

from deit_train.run.console import quiet_console
from deit_train.run.launch import rank_overrides
from deit_train.train import main

if __name__ == "__main__":
    sys.argv += rank_overrides()
    quiet_console()  # here too: a sweep's driver process (submitit) never enters main()
    main()
