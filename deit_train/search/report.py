"""What a search leaves people: a table of the best trial and of every trial, Optuna's optimisation-history and
parameter-importance plots (PNG), and the best parameters as overrides to paste into a plain run. Printed at the
end of a search, and for any study on request::

    python -m deit_train.search storage=sqlite:///outputs/quickstart/search_quickstart_distill/optuna.db \\
        study_name=quickstart_distill
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from deit_train.errors import ConfigError
from deit_train.run.cli import run_main
from deit_train.search.space import trial_overrides
from deit_train.search.study import IDENTITY, PLAIN_RUN, RUN_DIR, SAMPLER_SEED, open_storage

log = logging.getLogger("deit_train")

BEST_OVERRIDES = "best_overrides.txt"
HISTORY_PNG, IMPORTANCE_PNG = "optimization_history.png", "param_importances.png"


def _value(trial: FrozenTrial) -> str:
    return "" if trial.value is None else f"{trial.value:.4f}"


def _params(trial: FrozenTrial) -> str:
    return " ".join(trial_overrides(trial.params))


def print_tables(study: optuna.Study, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    # 200 columns as compare_runs: a log file or Slurm output is 80 columns to Rich, which cut parameters and paths
    console = console or Console(width=200)
    objective = study.user_attrs.get(IDENTITY, {}).get("objective", "value")
    trials = study.get_trials(deepcopy=False)
    table = Table("trial", "state", objective, "parameters", "run directory",
                  title=f"study {study.study_name}: {len(trials)} trials ({study.direction.name.lower()}, "
                        f"sampler seed {study.user_attrs.get(SAMPLER_SEED)})")
    for trial in trials:
        table.add_row(str(trial.number), trial.state.name.lower(), _value(trial), _params(trial),
                      str(trial.user_attrs.get(RUN_DIR, "")))
    console.print(table)
    best = best_trial(study)
    if best is None:
        console.print("no completed trial yet")
        return
    summary = Table("trial", objective, "parameters", "run directory", title="best trial")
    summary.add_row(str(best.number), _value(best), _params(best), str(best.user_attrs.get(RUN_DIR, "")))
    console.print(summary)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    return study.best_trial if any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)) else None


def write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optuna's matplotlib plots: the optimisation history (one completed trial is enough), the parameter
    importances (fANOVA: two or more completed trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    completed = sum(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))
    plots = [(HISTORY_PNG, optuna_plots.plot_optimization_history)] if completed else []
    if completed >= 2:
        plots.append((IMPORTANCE_PNG, optuna_plots.plot_param_importances))
    written = []
    for name, plot in plots:
        with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental: nothing to act on
            warnings.simplefilter("ignore")
            axes = plot(study)
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=120)
        plt.close(figure)
        written.append(out_dir / name)
    return written


def write_best_overrides(study: optuna.Study, out_dir: Path) -> Path | None:
    """``best_overrides.txt``: the overrides of a plain run that trains what the best trial trained, one line to
    paste after ``python -m deit_train``."""
    best = best_trial(study)
    if best is None:
        return None
    path = out_dir / BEST_OVERRIDES
    path.write_text(" ".join([*study.user_attrs.get(PLAIN_RUN, []), *trial_overrides(best.params)]) + "\n")
    return path


def finish_report(study: optuna.Study, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    print_tables(study)
    written = write_plots(study, out_dir)
    best = write_best_overrides(study, out_dir)
    if best is not None:
        log.info("best parameters as overrides (%s): python -m deit_train %s", best, best.read_text().strip())
    if written:
        log.info("plots: %s", ", ".join(str(p) for p in written))


def _main(cfg) -> None:
    if not cfg.storage:
        raise ConfigError(f"storage is not set\n{USAGE}")
    path = cfg.storage.removeprefix("sqlite:///") if cfg.storage.startswith("sqlite:///") else cfg.storage
    if "://" not in path and not Path(path).expanduser().is_file():
        raise ConfigError(f"storage={cfg.storage}: no such file (a search's storage, e.g. "
                          "sqlite:///<sweep dir>/optuna.db)")
    storage = open_storage(cfg.storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    name = cfg.study_name or (names[0] if len(names) == 1 else None)
    if name not in names:
        raise ConfigError(f"study_name={cfg.study_name}: the storage holds {', '.join(names) or 'no study'}: "
                          "pass study_name=<one of them>")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=name, storage=storage)
    out = Path(cfg.out) if cfg.out else (Path(path).expanduser().parent if "://" not in path else Path("."))
    finish_report(study, out)


USAGE = ("usage: python -m deit_train.search storage=<sqlite:///file.db | journal file> [study_name=<name>] "
         "[out=<folder for the plots and best_overrides.txt; default: the storage file's>]")


def main(argv: list[str] | None = None) -> None:
    run_main(_main, {"storage": None, "study_name": None, "out": None}, USAGE, argv)
