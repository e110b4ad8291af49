"""Teacher-only pass: ``python -m deit_train.teacher_cache experiment=<name> teacher.cache_dir=<dir> [overrides]``.

Fills the teacher-logit cache (:mod:`deit_train.teacher.cache`) for every epoch and every rank of the training run
that the same overrides describe, without training a student: e.g. on an inference node before a sweep. It walks
the same deterministic stream as training (sampler, per-sample seeds, per-batch Mixup/CutMix seeds), so the
shards are the ones a training run would write. Shards already committed are skipped: an interrupted pass is
resumed by running it again. Give the training run's ``trainer.devices`` / ``trainer.num_nodes`` (the world size
is part of the fingerprint); one process computes every rank's share.
"""
from __future__ import annotations

import logging
import sys

import hydra
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import DictConfig, open_dict
from tqdm import tqdm

from deit_train.run.config import CONFIG_DIR
from deit_train.data.stream import seed_globals, step_seed
from deit_train.errors import ConfigError, one_line_errors
from deit_train.run.environment import freeze_imported_objects
from deit_train.teacher.cache import TeacherLogitCache, build_teacher

log = logging.getLogger("deit_train")


def _world_size(trainer_cfg: DictConfig, device: torch.device) -> int:
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes") or 1)
    if devices == "auto":
        devices = torch.cuda.device_count() if device.type == "cuda" else 1
    if not isinstance(devices, int) or devices < 1:
        raise ConfigError(f"trainer.devices={devices}: give the training run's device count per node as a number")
    return devices * nodes


def _steps_per_epoch(batches: int, limit) -> int:
    """Lightning's ``num_training_batches`` for ``trainer.limit_train_batches``."""
    if limit is None:
        return batches
    return min(batches, int(limit)) if isinstance(limit, int) or float(limit) > 1 else int(batches * float(limit))


def _precision_context(precision, device: torch.device):
    """The autocast that Lightning puts around ``training_step`` for ``trainer.precision``."""
    name = str(precision)
    if name in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(name, device.type).forward_context()
    if name in ("32-true", "32"):
        return torch.autocast(device.type, enabled=False)
    raise ConfigError(f"trainer.precision={name}: the teacher-only pass supports 32-true, bf16-mixed and 16-mixed")


def fill_cache(cfg: DictConfig, progress: bool = True) -> dict:
    """Compute every missing (epoch, rank) shard of ``cfg``'s cache; returns counts and the entry path."""
    from deit_train.train import bootstrap_teacher

    cache = TeacherLogitCache.from_run_config(cfg)
    if cache is None:
        raise ConfigError("nothing to cache: set teacher.cache_dir=<dir> for an experiment with a teacher "
                          "(distill=hard|soft)")
    bootstrap_teacher(cfg)
    datamodule = instantiate(cfg.data)
    if "num_classes" in cfg.data:
        with open_dict(cfg):
            cfg.data.num_classes = datamodule.num_classes
    datamodule.setup("fit")
    on_gpu = cfg.trainer.get("accelerator", "auto") != "cpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    teacher = build_teacher(cfg.teacher)
    # as ClassificationModule.setup does before training fingerprints the teacher: its precision resolved on the
    # device it runs on (teacher.precision=auto), its outputs in the data's class order (teacher.class_order=match)
    teacher.prepare(device)
    teacher.match_classes(getattr(datamodule, "classes", None))
    mixup = instantiate(cfg.module.mixup) if cfg.module.get("mixup") is not None else None
    world = _world_size(cfg.trainer, device)
    cache.attach(teacher, datamodule, world)
    epochs = int(cfg.trainer.max_epochs)
    loaders = [datamodule.train_loader(world, rank) for rank in range(world)]
    steps = [_steps_per_epoch(len(loader), cfg.trainer.get("limit_train_batches")) for loader in loaders]
    counts = {"computed": 0, "cached": 0}
    bar = tqdm(total=epochs * sum(steps), desc="teacher cache", unit="batch", disable=not progress, file=sys.stderr)
    for epoch in range(epochs):
        for rank, loader in enumerate(loaders):
            if cache.start_epoch(epoch, rank, steps[rank], datamodule.batch_size):
                counts["cached"] += 1
                bar.update(steps[rank])
                continue
            loader.sampler.set_epoch(epoch)
            for batch_idx, batch in zip(range(steps[rank]), loader):
                images, target = datamodule.batch_to_device(batch, device)
                seed_globals(step_seed(cfg.seed, epoch, batch_idx, rank))  # what StepSeeding does in training
                if mixup is not None:
                    images, target = mixup(images, target)
                cache.at_step(batch_idx)
                with _precision_context(cfg.trainer.get("precision", "32-true"), device):
                    cache(images)
                bar.update(1)
            counts["computed"] += cache.finish_epoch()
    bar.close()
    shard_bytes = sum(p.stat().st_size for p in cache.entry.path.glob("epoch0000-*.npy"))
    return {**counts, "entry": str(cache.entry.path), "bytes_per_epoch": shard_bytes}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def fill_from_command_line(cfg: DictConfig) -> None:
    with one_line_errors():
        result = fill_cache(cfg, progress=cfg.trainer.get("enable_progress_bar", True))
    print(f"teacher cache {result['entry']}: {result['computed']} shard(s) computed, {result['cached']} already "
          f"there ({result['bytes_per_epoch'] / 2**20:.2f} MiB per epoch)")


def main() -> None:
    """The command line: ``deit-teacher-cache`` or ``python -m deit_train.teacher_cache``."""
    freeze_imported_objects()  # before Hydra, which may exit (--help) without calling the function
    fill_from_command_line()


if __name__ == "__main__":
    main()
