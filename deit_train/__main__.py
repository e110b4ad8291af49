import sys

from deit_train.launch import rank_overrides
from deit_train.train import main

if __name__ == "__main__":
    sys.argv += rank_overrides()
    main()
