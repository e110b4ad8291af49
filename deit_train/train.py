"""Entry point: ``python -m deit_train experiment=<name> [overrides]``.

Instantiates data, student, teacher, loss, LightningModule, callbacks, loggers and trainer from the
Hydra config, fits, tests the best checkpoint, and writes ``results.json`` into the run directory.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, open_dict

from deit_train.checkpointing import AtomicCheckpointIO, atomic_torch_save
from deit_train.config import CONFIG_DIR
from deit_train.errors import find_config_error
from deit_train.models.checkpoint import read_state_dict

log = logging.getLogger("deit_train")

# Overrides about *how* to run (not *what* to train) that a bootstrapped teacher stage inherits.
_RUN_OVERRIDE_PREFIXES = ("trainer.", "callbacks", "logger", "paths.")


def train(cfg: DictConfig) -> dict:
    """Run one experiment; returns the metrics written to ``results.json``."""
    started = time.perf_counter()
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    if "num_classes" in cfg.data:  # a source may count its classes (e.g. folders); models read ${data.num_classes}
        with open_dict(cfg):
            cfg.data.num_classes = datamodule.num_classes
    bootstrap_teacher(cfg)
    module = instantiate(cfg.module)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # `trainer.enable_progress_bar=false` also drops Rich's
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=[AtomicCheckpointIO()])
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    results: dict = {"run_dir": str(output_dir)}
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        results["best_checkpoint"] = best
        results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("test/", "teacher/test"))})
    results.update(getattr(module, "param_counts", {}))
    results["epochs"] = trainer.current_epoch
    results["wall_time_s"] = round(time.perf_counter() - started, 2)
    if trainer.is_global_zero:
        write_json(output_dir / "results.json", results)
    return results


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
    tmp.replace(path)


def bootstrap_teacher(cfg: DictConfig) -> None:
    """Train the teacher first with experiment ``cfg.teacher_recipe`` when its checkpoint is missing.

    The quickstart's digits teacher is made by this same framework and cached at ``teacher.checkpoint``
    (weights only), so later runs reuse it.
    """
    recipe, teacher = cfg.get("teacher_recipe"), cfg.get("teacher")
    if not recipe or not teacher or not teacher.get("checkpoint") or Path(teacher.checkpoint).is_file():
        return
    log.info("teacher checkpoint %s missing: training it first with experiment=%s", teacher.checkpoint, recipe)
    inherited = [o for o in HydraConfig.get().overrides.task if o.startswith(_RUN_OVERRIDE_PREFIXES)]
    stage_cfg = hydra.compose(config_name="train", overrides=[
        f"experiment={recipe}", f"seed={cfg.seed}", *inherited, f"paths.output_dir={cfg.paths.output_dir}/teacher",
    ])
    results = train(stage_cfg)
    atomic_torch_save(read_state_dict(results["best_checkpoint"]), Path(teacher.checkpoint).expanduser())
    log.info("teacher cached at %s (test top-1 %.4f)", teacher.checkpoint, results.get("test/top1", float("nan")))


def print_summary(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="test accuracy")
    table.add_column("model")
    table.add_column("top-1", justify="right")
    table.add_column("top-5", justify="right")
    rows = [("teacher", "teacher/test_top1", None), ("student (prediction)", "test/top1", "test/top5"),
            ("student cls head", "test/top1_cls", "test/top5_cls"), ("student dist head", "test/top1_dist", "test/top5_dist")]
    for name, top1, top5 in rows:
        if top1 in results:
            table.add_row(name, f"{results[top1]:.4f}", f"{results[top5]:.4f}" if top5 in results else "")
    console = Console()
    console.print(table)
    console.print(f"run directory: {results['run_dir']}  ({results['wall_time_s']:.0f} s)")


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        results = train(cfg)
    except Exception as exc:  # user errors become one line; anything else keeps its traceback
        error = find_config_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if "test/top1" in results:
        print_summary(results)

