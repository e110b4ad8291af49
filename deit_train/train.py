"""Entry point: ``python -m deit_train experiment=<name> [overrides]``.

Instantiates data, student, teacher, loss, LightningModule, callbacks, loggers and trainer from the
Hydra config, fits, tests the best checkpoint, and writes ``results.json`` into the run directory.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from deit_train.run.cadence import ValidateFinalEpoch
from deit_train.run.checkpoints import AtomicCheckpointIO, atomic_torch_save
from deit_train.compare.plots import plot_curves
from deit_train.compare.runs import load_local_run
from deit_train.run.config import CONFIG_DIR, require_experiment
from deit_train.run.console import quiet_console
from deit_train.data.stream import StepSeeding
from deit_train.run.environment import threads_from_slurm
from deit_train.errors import ConfigError, one_line_errors
from deit_train.run.loggers import log_run_config
from deit_train.teacher.cache import TeacherLogitCache
from deit_train.run.plots import plot_loss_curve
from deit_train.teacher.identity import teacher_file
from deit_train.modules.disagreement import disagreement_table
from deit_train.run.preflight import preflight
from deit_train.run.requeue import Requeued, SlurmRequeue
from deit_train.search.objective import objective_value, refuse_search_without_multirun
from deit_train.run.resume import resume_checkpoint, withdraw_unused_record
from deit_train.run.throughput import WallClockThroughput
from deit_train.stops import RankWideStop
from deit_train.run.trained_model import StoreRunConfig

log = logging.getLogger("deit_train")

# Overrides about *how* to run (not *what* to train) that a bootstrapped teacher stage inherits.
_RUN_OVERRIDE_PREFIXES = ("trainer.", "callbacks", "logger", "paths.")
# ... except Lightning's debugging switches, which must not make the cached quickstart teacher (debug= is not inherited)
_DEBUG_OVERRIDE_PREFIXES = ("trainer.fast_dev_run", "trainer.overfit_batches")
# ... and how long it trains: the cached teacher is its recipe's, not a shortened run's (teacher_recipe_overrides
# shortens it explicitly)
_SCHEDULE_OVERRIDE_PREFIXES = ("trainer.max_epochs", "trainer.min_epochs", "trainer.max_steps", "trainer.min_steps",
                               "trainer.max_time", "trainer.limit_", "trainer.accumulate_grad_batches")


def train(cfg: DictConfig) -> dict:
    """Run one experiment (or its ``stages``); returns the metrics written to ``results.json``.

    Phases: preflight (every check that can fail without training), teacher (bootstrapped on first use), build,
    fit, test, record."""
    preflight(cfg)
    if cfg.get("stages"):
        return run_stages(cfg)
    started = time.perf_counter()
    bootstrap_teacher(cfg)  # before seeding: a run gives the same result whether the teacher was cached or not
    datamodule, module, trainer = build(cfg)
    fit(cfg, trainer, module, datamodule)
    results = {"run_dir": str(Path(cfg.paths.output_dir)), **fit_results(trainer)}
    if cfg.get("test", True):
        results.update(test_best(trainer, module, datamodule))
    results.update(getattr(module, "param_counts", {}))
    results["epochs"] = trainer.current_epoch
    results["wall_time_s"] = round(time.perf_counter() - started, 2)
    if trainer.is_global_zero:
        record(results, Path(cfg.paths.output_dir), cfg.task_name)
    return results


def build(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """Data, module (student, teacher, loss), callbacks, loggers and trainer from the config."""
    L.seed_everything(cfg.seed, workers=True)
    if torch.cuda.is_available():  # TF32 matmuls on Ampere+ (CPU matmuls are left exact)
        torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision") or "highest")
    datamodule = instantiate(cfg.data)  # data.num_classes: counted by the preflight where the source counts them
    module = instantiate(cfg.module)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # `trainer.enable_progress_bar=false` also drops Rich's
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    callbacks.insert(0, RankWideStop())  # first: decides on a stopped batch before any other hook reads it
    callbacks.append(StoreRunConfig(cfg))  # export/predict rebuild the model from the checkpoint alone
    callbacks.append(StepSeeding(cfg.seed))  # Mixup, drop-path, masks: per (seed, epoch, batch, rank)
    callbacks.append(SlurmRequeue())  # Slurm's warning signal: one checkpoint where all ranks agree, requeue, stop
    callbacks.append(WallClockThroughput())  # train/throughput: images per wall-clock second, loading included
    callbacks.append(ValidateFinalEpoch())  # last_epoch/val/* is the final epoch's under check_val_every_n_epoch
    if (cache := TeacherLogitCache.from_run_config(cfg)) is not None:  # teacher.cache_dir
        callbacks.append(cache)
    if cfg.get("optuna_trial") is not None:  # a search's trial reports to its study (Optuna imported only here)
        from deit_train.search.pruning import StudyPruning

        callbacks.append(StudyPruning.from_run_config(cfg))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    log_run_config(loggers, cfg)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])
    return datamodule, module, trainer


def fit(cfg: DictConfig, trainer: L.Trainer, module: L.LightningModule, datamodule) -> None:
    """Train, continuing from the newest checkpoint of the run directory (or ``ckpt_path``)."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(trainer, cfg.get("ckpt_path")))
    except Requeued as requeued:  # Slurm's warning signal: saved; requeue now that the trainer has torn down
        requeued.requeue(Path(cfg.paths.output_dir))
        raise


def fit_results(trainer: L.Trainer) -> dict:
    """The final epoch's validation metrics (incl. the val disagreement table, Tab. 4) and the callbacks' own
    results (the token diagnostics)."""
    results = last_epoch_metrics(trainer.callback_metrics)
    for callback in trainer.callbacks:
        results.update(getattr(callback, "run_results", dict)())
    return results


def test_best(trainer: L.Trainer, module: L.LightningModule, datamodule) -> dict:
    """Test the best checkpoint (the last weights without one): ``test/*``, what chose it, and whether the test
    images are the validation images that chose it."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    results: dict = {"best_checkpoint": best}
    if best and trainer.checkpoint_callback.best_model_score is not None:  # what chose it, beside last_epoch/
        results[f"best/{trainer.checkpoint_callback.monitor}"] = float(trainer.checkpoint_callback.best_model_score)
    results.update({k: float(v) for k, v in trainer.callback_metrics.items()
                    if k.startswith(("test/", "test_ema/", "teacher/test"))})
    results.update(split_honesty(datamodule))
    return results


def record(results: dict, output_dir: Path, task_name: str) -> None:
    """The curves (val top-1, or the loss when no labels are scored) and ``results.json`` of the run directory."""
    metrics_csv = output_dir / "csv" / "metrics.csv"
    if metrics_csv.is_file():  # curves are easier seen than read
        with open(metrics_csv) as handle:
            scored = "val/top1" in handle.readline().strip().split(",")
        results["curves"] = str(
            plot_curves([load_local_run(output_dir, task_name)], output_dir / "val_top1.png") if scored
            else plot_loss_curve(metrics_csv, output_dir / "val_loss.png"))  # no labels scored (SimMIM)
    write_json(output_dir / "results.json", results)


def last_epoch_metrics(metrics: dict) -> dict[str, float]:
    """The final epoch's validation metrics (``last_epoch/val/top1``, ...), next to the best checkpoint's test."""
    return {f"last_epoch/{k}": float(v) for k, v in metrics.items() if k.startswith(("val/", "val_ema/"))}


def split_honesty(datamodule) -> dict:
    """Whether ``test/*`` was scored on the validation images that picked the best checkpoint (ImageNet, CIFAR):
    then it is optimistic, and ``last_epoch/val/*`` is the unselected figure."""
    splits = getattr(datamodule, "splits", None)
    same = splits["test"] == splits["val"] if splits else datamodule.test_set is datamodule.val_set
    note = {"test_split_is_val": same}
    if same:
        note["test_note"] = ("test/* scores the checkpoint chosen by val/top1 on the same validation images "
                             "(optimistic); last_epoch/val/* is the final epoch's, not selected")
    return note


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def bootstrap_teacher(cfg: DictConfig) -> None:
    """Train the teacher first with experiment ``cfg.teacher_recipe`` when its checkpoint is missing.

    The quickstart's digits teacher is made by this same framework and cached at ``teacher.checkpoint``
    (weights and identity: architecture, normalisation, resolution, class names), so later runs reuse it.
    """
    recipe, teacher = cfg.get("teacher_recipe"), cfg.get("teacher")
    if not recipe or not teacher or not teacher.get("checkpoint") or Path(teacher.checkpoint).is_file():
        return
    target = Path(teacher.checkpoint).expanduser()
    try:  # fail before training, not after, when the file could not be written
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"teacher.checkpoint={target} cannot be created ({exc.strerror}): point it at a "
                          "writable path or set DEIT_TRAIN_CACHE") from exc
    debugging = [o for o in HydraConfig.get().overrides.task if o.startswith(_DEBUG_OVERRIDE_PREFIXES)
                 and o.split("=", 1)[-1].lower() not in ("false", "0", "0.0", "null")]
    if debugging:  # compose_stage passes trainer.* overrides on: the cached teacher would be a debugging run
        raise ConfigError(f"{debugging[0]} would also train the teacher that teacher.checkpoint={target} caches: "
                          "use debug=fdr|overfit instead (the teacher is then trained in full, once)")
    own = list(cfg.get("teacher_recipe_overrides") or [])
    log.info("teacher checkpoint %s missing: training it first with experiment=%s %s", target, recipe, " ".join(own))
    schedule = [o for o in HydraConfig.get().overrides.task if o.startswith(_SCHEDULE_OVERRIDE_PREFIXES)]
    if schedule:
        log.info("the teacher trains on its recipe's schedule, not on %s (teacher_recipe_overrides=[...] changes it)",
                 " ".join(schedule))
    # the teacher learns from the student's training subset, as the paper's teacher sees the student's data
    subset = ([f"data.train_fraction={cfg.data.train_fraction}", f"data.split_seed={cfg.data.split_seed}"]
              if cfg.data.get("train_fraction", 1.0) != 1.0 else [])
    try:
        stage = compose_stage(cfg, [f"experiment={recipe}", *subset, *own], Path(cfg.paths.output_dir) / "teacher",
                              not_inherited=_SCHEDULE_OVERRIDE_PREFIXES)
    except (ConfigCompositionException, OverrideParseException) as exc:
        if not own:
            raise
        reason = " ".join(line.strip() for line in str(exc).splitlines()[:1] + str(exc.__cause__ or "").splitlines()[:1])
        raise ConfigError(f"teacher_recipe_overrides={own} do not apply to experiment={recipe}: {reason}") from exc
    results = train(stage)
    atomic_torch_save(teacher_file(results["best_checkpoint"]), target)
    log.info("teacher cached at %s (test top-1 %.4f)", target, results.get("test/top1", float("nan")))


def compose_stage(cfg: DictConfig, overrides: list[str], output_dir: Path,
                  not_inherited: tuple[str, ...] = ()) -> DictConfig:
    """The config of a sub-run in ``output_dir`` (a bootstrapped teacher, a stage): ``overrides`` on the root
    config, plus the parent's seed and its command-line overrides about how to run (trainer, callbacks, ...)
    except those starting with one of ``not_inherited``."""
    inherited = [o for o in HydraConfig.get().overrides.task
                 if o.startswith(_RUN_OVERRIDE_PREFIXES) and not o.startswith(not_inherited)]
    return hydra.compose(config_name="train", overrides=[
        f"seed={cfg.seed}", *overrides, *inherited, f"paths.output_dir={output_dir}"])


def run_stages(cfg: DictConfig) -> dict:
    """Run the experiments of ``cfg.stages`` (stage name -> overrides) in order, each in ``<run dir>/<name>``.

    A stage uses an earlier stage's files by path, e.g.
    ``model.init_from='${paths.output_dir}/pretrain/checkpoints/last.ckpt'``; the run overrides given on the
    command line (trainer, callbacks, logger, paths) and the seed apply to every stage.
    """
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    results: dict = {"run_dir": str(output_dir), "stages": {}}
    for name, overrides in cfg.stages.items():
        log.info("stage %s: %s", name, " ".join(overrides))
        results["stages"][name] = train(compose_stage(cfg, list(overrides), output_dir / name))
    results["wall_time_s"] = round(time.perf_counter() - started, 2)
    if rank_zero_only.rank == 0:
        write_json(output_dir / "results.json", results)
    return results


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def print_summary(results: dict) -> None:
    """A table of the test metrics (per stage for staged runs) and the run directory."""
    from rich.console import Console
    from rich.table import Table

    if "stages" in results:
        table = Table("stage", "test top-1", "test loss", "run directory", title="stages")
        for name, stage in results["stages"].items():
            table.add_row(name, _fmt(stage.get("test/top1")), _fmt(stage.get("test/loss")), stage.get("run_dir", ""))
    else:
        table = Table("model", "top-1", "top-5", title="test accuracy")
        rows = [("teacher", "teacher/test_top1", None), ("student (prediction)", "test/top1", "test/top5"),
                ("student cls head", "test/top1_cls", "test/top5_cls"),
                ("student dist head", "test/top1_dist", "test/top5_dist"),
                ("EMA (prediction)", "test_ema/top1", "test_ema/top5"),
                ("EMA cls head", "test_ema/top1_cls", "test_ema/top5_cls"),
                ("EMA dist head", "test_ema/top1_dist", "test_ema/top5_dist")]
        for name, top1, top5 in rows:
            if top1 in results:
                table.add_row(name, _fmt(results[top1]), _fmt(results.get(top5)))
    console = Console()
    console.print(table)
    disagreement = disagreement_table(results)
    if disagreement is not None:
        console.print(disagreement)
    console.print(f"run directory: {results['run_dir']}  ({results['wall_time_s']:.0f} s)")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Returns the objective of a search's trial (``optimized_metric``) to Hydra's sweeper."""
    with one_line_errors():
        try:
            require_experiment(HydraConfig.get().runtime.choices.get("experiment"),
                               list(HydraConfig.get().overrides.task))
            refuse_search_without_multirun(HydraConfig.get())
            quiet_console()
            threads_from_slurm()
            results = train(cfg)
        except ConfigError:  # the user changes the command: a new run directory's record must not refuse it
            withdraw_unused_record(cfg.paths.output_dir)
            raise
        objective = objective_value(cfg, results)
    if rank_zero_only.rank == 0 and ("test/top1" in results or "stages" in results):  # every DDP rank: one summary
        print_summary(results)
    return objective

