"""Hyperparameter search: Optuna studies driven by Hydra's sweeper interface (``-m hparams_search=<name>``).

- :mod:`.space`: the search space of ``hydra.sweeper.params`` as Optuna distributions, checked against the config;
- :mod:`.study`: the study in its storage (RDB URL or journal file), its identity and its seeded sampler;
- :mod:`.objective`: which metrics a run records, and the objective ``main()`` returns;
- :mod:`.pruning`: the Lightning callback that reports each epoch's metric to the study and stops pruned trials;
- :mod:`.sweeper`: the loop that asks Optuna for trials and hands them to Hydra's launcher;
- :mod:`.report`: the tables, plots and best overrides of a study (``python -m deit_train.search``).
"""
