"""Hyperparameter search: Optuna studies driven by Hydra's sweeper interface (``-m hparams_search=<name>``).

- :mod:`.space`: the search space of ``hydra.sweeper.params`` as Optuna distributions, checked against the config;
- :mod:`.study`: the study in its storage (RDB URL or journal file), its identity and its seeded sampler;
- :mod:`.objective`: which metrics a run records, and the objective ``main()`` returns;
- :mod:`.pruning`: the Lightning callback that reports each epoch's metric to the study and stops pruned trials;
- :mod:`.sweeper`: the loop that asks Optuna for trials and hands them to Hydra's launcher;
- :mod:`.report`: the tables, plots and best overrides of a study (``python -m deit_train.search``).
"""


def register_sweeper() -> None:
    """Make ``hydra/sweeper=optuna`` known to Hydra however deit_train was installed.

    Hydra finds plugins by walking the ``hydra_plugins`` folders on ``sys.path``. A wheel puts ours there; the
    README's editable install (``pip install -e``) maps it through an import hook that walk does not see, so run
    outside the repository, a search would fail with "Unknown plugin class". Registering the class directly is
    Hydra's documented way (``Plugins.register``) and is idempotent.
    """
    from hydra.core.plugins import Plugins
    from hydra_plugins.deit_train_optuna_sweeper.optuna_sweeper import OptunaSweeper

    Plugins.instance().register(OptunaSweeper)
