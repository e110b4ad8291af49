"""deit_train's Hydra sweeper for Optuna >= 4 (``hydra/sweeper=optuna``), found by Hydra's plugin scan of the
``hydra_plugins`` namespace package; its work is in :mod:`deit_train.search`."""
