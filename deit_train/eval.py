"""Evaluate a checkpoint of this framework: ``python -m deit_train.eval ckpt=<run>/checkpoints/<name>.ckpt``.

The data set is the one the checkpoint was trained on (its stored ``data`` config; ``data.<key>=...`` changes
a key, e.g. ``data.root=/other/imagenet``), under its evaluation transform, on the ``test`` split
(``split=val`` for the validation split; ImageNet-layout folders test on their validation split). Reports top-1 and
top-5 of the prediction (heads averaged) and of each head, prints them and writes ``out=<file>.json`` when given.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from deit_train.run.cli import run_main
from deit_train.errors import ConfigError
from deit_train.models.deit import forward_heads, is_distilled
from deit_train.modules.metrics import EvalMetrics
from deit_train.run.trained_model import load_trained_model, read_run_config

USAGE = """usage: python -m deit_train.eval ckpt=<run_dir>/checkpoints/<name>.ckpt [split=test|val]
  [data.<key>=<value> ...] [batch_size=<stored>] [out=metrics.json] [device=cpu]"""
DEFAULTS = {"ckpt": None, "split": "test", "data": {}, "batch_size": None, "out": None, "device": "cpu"}
SPLITS = ("test", "val")


@torch.no_grad()
def evaluate(ckpt: str | Path, split: str = "test", data_overrides: dict | None = None, batch_size: int | None = None,
             device: str = "cpu") -> dict[str, float]:
    """``{"<split>/top1": ..., "<split>/top5": ..., "<split>/top1_cls": ..., ...}`` of ``ckpt`` on its data set."""
    if split not in SPLITS:
        raise ConfigError(f"split={split} is not one of {', '.join(SPLITS)}")
    trained = load_trained_model(ckpt)
    if trained.task != "classification":
        raise ConfigError(f"ckpt={ckpt} is a SimMIM pretraining checkpoint: it has no classifier to evaluate; "
                          "evaluate a fine-tuned one")
    data_config = {**(read_run_config(ckpt).get("data") or {}), **(data_overrides or {})}
    if "_target_" not in data_config:
        raise ConfigError(f"ckpt={ckpt} stores no data config: pass the data set as data._target_=... data.root=...")
    if batch_size is not None:
        data_config["batch_size"] = batch_size
    datamodule = instantiate(data_config)
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    model = trained.model.to(device)
    metrics = EvalMetrics(split, model.num_classes, is_distilled(model), with_teacher=False).to(device)
    for images, target in loader:
        cls, dist = forward_heads(model, images.to(device))
        metrics.update(target.to(device), cls, dist, None)
    return {name: float(metric.compute()) for name, metric in metrics.loggable().items()}


def main(cfg: DictConfig) -> None:
    if not cfg.ckpt:
        raise ConfigError(f"ckpt is not set: pass ckpt=<run_dir>/checkpoints/<name>.ckpt\n{USAGE}")
    overrides = OmegaConf.to_container(cfg.data, resolve=True)
    result = evaluate(cfg.ckpt, cfg.split, overrides, cfg.batch_size, cfg.device)
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=2, sort_keys=True))
    print(json.dumps(result, indent=2, sort_keys=True))


def cli() -> None:
    """The command line: ``deit-eval`` or ``python -m deit_train.eval``."""
    run_main(main, DEFAULTS, USAGE)


if __name__ == "__main__":
    cli()
