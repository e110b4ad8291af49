"""Which metrics a run records (``results.json``), checked before a search trains, and the objective ``main()``
returns to Hydra's sweeper (``optimized_metric``)."""
from __future__ import annotations

from omegaconf import DictConfig

from deit_train.errors import ConfigError

_CLASSIFICATION = "deit_train.modules.ClassificationModule"


def epoch_metrics(cfg: DictConfig) -> set[str] | None:
    """The validation metrics a run logs every validated epoch (``val/top1``, ...); None for modules other than the
    classification module (not checked)."""
    from deit_train.modules.metrics import EvalMetrics

    if cfg.module.get("_target_") != _CLASSIFICATION:
        return None
    distilled, with_teacher = bool(cfg.model.get("distilled")), cfg.get("teacher") is not None
    names = {*EvalMetrics("val", int(cfg.data.num_classes), distilled, with_teacher).loggable(), "val/loss", "val/ce"}
    if cfg.module.get("ema_decay") is not None:
        names |= set(EvalMetrics("val_ema", int(cfg.data.num_classes), distilled, False).loggable())
    return names


def recorded_metrics(cfg: DictConfig) -> set[str] | None:
    """The metrics of a run's ``results.json`` that can be an objective: ``last_epoch/val/*``; when it tests,
    ``test/*``, ``teacher/test_top1`` and ``best/<checkpoint monitor>``; None when not known (other modules)."""
    from deit_train.modules.metrics import EvalMetrics

    per_epoch = epoch_metrics(cfg)
    if per_epoch is None:
        return None
    names = {f"last_epoch/{name}" for name in per_epoch if name.startswith(("val/", "val_ema/"))}
    if cfg.get("test", True):  # best/<monitor> is recorded beside the test of the best checkpoint
        test = EvalMetrics("test", int(cfg.data.num_classes), bool(cfg.model.get("distilled")),
                           cfg.get("teacher") is not None).loggable()
        names |= {name for name in [*test, "test/loss", "test/ce"] if name.startswith(("test/", "teacher/test"))}
        monitor = ((cfg.get("callbacks") or {}).get("model_checkpoint") or {}).get("monitor")
        if monitor:
            names.add(f"best/{monitor}")
    return names


def check_metrics(cfg: DictConfig, objective: str | None, pruning_metric: str | None) -> None:
    """The objective is a metric the run records, the pruning metric one it logs every epoch."""
    if not objective:
        raise ConfigError("optimized_metric is not set: name the metric the search optimises, e.g. "
                          "optimized_metric=best/val/top1")
    recorded = recorded_metrics(cfg)
    if recorded is not None and objective not in recorded:
        raise ConfigError(f"optimized_metric={objective} is not a metric this run records: use one of "
                          f"{', '.join(sorted(recorded))}")
    per_epoch = epoch_metrics(cfg)
    if pruning_metric and per_epoch is not None and pruning_metric not in per_epoch:
        raise ConfigError(f"hydra.sweeper.pruning_metric={pruning_metric} is not logged every epoch: use one of "
                          f"{', '.join(sorted(per_epoch))}")


def objective_value(cfg: DictConfig, results: dict) -> float | None:
    """What ``main()`` returns: ``results[optimized_metric]``, or None outside a search."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if not isinstance(results.get(name), (int, float)):  # NaN (a diverged run) is returned: the trial fails
        raise ConfigError(f"optimized_metric={name} was not recorded by this run (results.json has "
                          f"{', '.join(sorted(k for k, v in results.items() if isinstance(v, float)))})")
    return float(results[name])


def refuse_search_without_multirun(hydra_config) -> None:
    """``hparams_search=<name>`` names a search, which only a multirun (``-m``) runs."""
    from hydra.types import RunMode

    search = hydra_config.runtime.choices.get("hparams_search")
    if search and hydra_config.mode == RunMode.RUN:
        raise ConfigError(f"hparams_search={search} runs a search: add -m (python -m deit_train -m "
                          f"hparams_search={search} experiment=...)")
