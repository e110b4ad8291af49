"""Options checked before anything is built, so that a bad one is one line naming it (not a traceback from deep
inside timm, torch or Lightning): numbers given as text, counts below their minimum, unusable paths."""
from __future__ import annotations

import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from deit_train.errors import ConfigError

# Counts and their minimum (num_workers 0 = load in the main process).
COUNTS = {"data.batch_size": 1, "trainer.max_epochs": 1, "data.num_workers": 0, "trainer.accumulate_grad_batches": 1}
# Numbers in some configs that also take text: `trainer.devices=auto|0,1`, `trainer.precision=bf16-mixed`.
NUMBER_OR_TEXT = ("trainer.devices", "trainer.precision")
# Options holding a weights file (or a transformers directory).
WEIGHT_FILES = ("teacher.checkpoint", "model.init_from")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_options(cfg: DictConfig) -> None:
    """Counts, and numbers typed as text on the command line (inside a Hydra run)."""
    check_counts(cfg)
    check_fsdp_combinations(cfg)
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    task = list(hydra_cfg.overrides.task)
    values = [o for o in task if "=" in o and o.lstrip("+~").partition("=")[0] not in hydra_cfg.runtime.choices]
    if any(isinstance(OmegaConf.select(cfg, o.lstrip("+~").partition("=")[0], default=None,
                                       throw_on_resolution_failure=False), str) for o in values):
        defaults = hydra.compose(config_name="train", overrides=[o for o in task if o not in values])
        check_number_overrides(cfg, values, defaults)


def check_counts(cfg: DictConfig) -> None:
    for option, minimum in COUNTS.items():
        value = OmegaConf.select(cfg, option, default=None)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{option}={value!r} is not a whole number: pass an integer >= {minimum}")
        if value < minimum:
            raise ConfigError(f"{option}={value} must be at least {minimum}: pass an integer >= {minimum}")


def uses_fsdp(cfg: DictConfig) -> bool:
    """``strategy=fsdp`` (Lightning's FSDPStrategy, as a config or by its registered names ``fsdp*``)."""
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    if isinstance(strategy, str):
        return strategy.startswith("fsdp")
    return isinstance(strategy, DictConfig) and str(strategy.get("_target_", "")).endswith("FSDPStrategy")


def check_fsdp_combinations(cfg: DictConfig) -> None:
    """What FSDP cannot do here, refused before anything trains instead of running wrong."""
    if not uses_fsdp(cfg):
        return
    ema = OmegaConf.select(cfg, "module.ema_decay", default=None)
    if ema:  # the EMA would average this rank's 1-d parameter shards against a full copy
        raise ConfigError(f"module.ema_decay={ema} does not work with strategy=fsdp (the student's parameters are "
                          "shards): use strategy=ddp, or module.ema_decay=null")
    clip = OmegaConf.select(cfg, "trainer.gradient_clip_val", default=None)
    if clip:  # its norm must be reduced over the shards; Lightning's FSDP precision plugin refuses instead
        raise ConfigError(f"trainer.gradient_clip_val={clip} does not work with strategy=fsdp (Lightning's FSDP "
                          "precision plugin cannot clip): use strategy=ddp, or trainer.gradient_clip_val=null")
    distilled = OmegaConf.select(cfg, "model.distilled", default=False, throw_on_resolution_failure=False)
    if OmegaConf.select(cfg, "callbacks.token_diagnostics", default=None) is not None and distilled is True:
        # the class and distillation heads' weights are 1-d shards of different sizes under FULL_SHARD
        raise ConfigError("callbacks.token_diagnostics does not work with strategy=fsdp (the heads' weights are "
                          "sharded): use strategy=ddp, or drop it with ~callbacks.token_diagnostics")


def check_number_overrides(cfg: DictConfig, overrides: list[str], defaults: DictConfig) -> None:
    """``key=text`` typed where ``defaults`` (the config composed without value overrides) holds a number."""
    for override in overrides:
        key, _, _ = override.lstrip("+~").partition("=")
        default = OmegaConf.select(defaults, key, default=None)
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if _is_number(default) and isinstance(value, str) and key not in NUMBER_OR_TEXT:
            raise ConfigError(f"{key}={value!r} is not a number (the config's default is {default}): pass a number")


def load_checkpoint_file(option: str, path: str | os.PathLike):
    """The object stored in ``path`` (memory-mapped, so cheap for large files), or one line naming ``option``:
    missing, unreadable, truncated, not a checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{option}={path} does not exist: check the path")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{option}={path} is not a readable file: check the path and its permissions")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: None for key in handle.keys()}
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as exc:  # a file in torch's legacy (pre-1.6) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch/safetensors raise many types for a truncated or foreign file
        raise ConfigError(f"{option}={path} cannot be read as a checkpoint ({type(exc).__name__}; truncated or not a "
                          "torch/safetensors file): pass a .pth/.ckpt/.safetensors file of weights") from exc


def check_paths(cfg: DictConfig) -> None:
    """Weight files and the data root: present, readable, and (for weights) a checkpoint at all."""
    from deit_train.models.hf_convert import is_hf_directory

    for option in WEIGHT_FILES:
        value = OmegaConf.select(cfg, option, default=None)
        if value and not is_hf_directory(Path(str(value)).expanduser()):
            load_checkpoint_file(option, value)
    root = OmegaConf.select(cfg, "data.root", default=None)
    if root:
        path = Path(str(root)).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data.root={path} is not a folder: check the path")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"data.root={path} is not readable: check its permissions")
