"""Preflight: every check that can fail without training, in one place, before anything trains or is written.

A bad option is one line naming it (not a traceback from deep inside timm, torch or Lightning, and not after a
teacher was bootstrapped for an hour): the run directory's record, numbers given as text, counts below their
minimum, probabilities and fractions out of range, unusable paths (named by the option that gave them), the
accelerator, the data source's own checks, the student's shapes and the checkpoint to resume from."""
from __future__ import annotations

import os
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from deit_train.errors import ConfigError, find_config_error
from deit_train.run.checkpoints import load_checkpoint_file
from deit_train.run.environment import check_accelerator
from deit_train.run.launch import is_global_zero
from deit_train.run.resume import (check_checkpoint_fits, check_same_experiment, record_trained_config,
                                   trained_values)

# Counts and their minimum (num_workers 0 = load in the main process).
COUNTS = {"data.batch_size": 1, "trainer.max_epochs": 1, "data.num_workers": 0, "trainer.accumulate_grad_batches": 1,
          "trainer.num_nodes": 1, "trainer.check_val_every_n_epoch": 1, "augment.repeated_aug": 1,
          "augment.re_count": 1, "teacher.cache_topk": 1, "model.image_size": 1, "model.patch_size": 1,
          "model.num_hidden_layers": 1, "model.num_attention_heads": 1}
# Numbers and their range: (low, high, low included, high included, what the number is).
RANGES = {
    **{option: (0.0, 1.0, True, True, "a probability in [0, 1]") for option in (
        "augment.hflip", "augment.re_prob", "augment.mixup_prob", "augment.mixup_switch_prob", "distill.alpha",
        "teacher.min_val_top1", "module.mask_ratio")},
    **{option: (0.0, 1.0, False, True, "a fraction in (0, 1]") for option in ("data.train_fraction", "optim.layer_decay")},
    **{option: (0.0, 1.0, True, False, "a rate in [0, 1)") for option in (
        "augment.label_smoothing", "loss.label_smoothing", "model.drop_path_rate", "module.ema_decay")},
    **{option: (0.0, float("inf"), True, False, "a number >= 0") for option in (
        "optim.weight_decay", "optim.warmup_epochs", "optim.warmup_lr", "optim.min_lr", "augment.mixup_alpha",
        "augment.cutmix_alpha")},
    **{option: (0.0, float("inf"), False, False, "a number > 0") for option in ("optim.base_lr", "distill.tau")},
}
# Numbers in some configs that also take text: `trainer.devices=auto|0,1`, `trainer.precision=bf16-mixed`.
NUMBER_OR_TEXT = ("trainer.devices", "trainer.precision")
# Options holding a weights file (or a transformers directory).
WEIGHT_FILES = ("teacher.checkpoint", "model.init_from")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def preflight(cfg: DictConfig) -> None:
    """Everything that can be checked before training, cheapest first; the first failure is one line (exit 2).

    Nothing is written before every check passed: a refused start leaves an existing run directory as it was;
    then the resolved trained values are recorded for the run directory's guard. A staged run checks its own
    options here and each stage's when the stage starts (a stage's inputs are the earlier stages' outputs)."""
    check_same_experiment(cfg, cfg.paths.output_dir)  # a run directory's stored config is its record
    trained = trained_values(cfg)  # as configured (before the data source counts its classes into it)
    check_options(cfg)
    if not cfg.get("stages"):
        check_paths(cfg, skip=("teacher.checkpoint",) if teacher_to_bootstrap(cfg) else ())
        count_classes(cfg)  # the data source's own checks (root, class count)
        check_student(cfg)
        if cfg.get("ckpt_path"):
            check_checkpoint_fits(cfg.ckpt_path, cfg)
        check_accelerator(cfg.trainer.accelerator)  # where Lightning would raise its MisconfigurationException
        check_device_decode(cfg)
    if is_global_zero():  # all checks passed: what the guard compares a later start with
        record_trained_config(trained, cfg.paths.output_dir)


def teacher_to_bootstrap(cfg: DictConfig) -> bool:
    """Whether the run's teacher phase will train the teacher (``teacher_recipe``, its file still missing)."""
    checkpoint = OmegaConf.select(cfg, "teacher.checkpoint", default=None)
    return bool(cfg.get("teacher_recipe") and checkpoint and not Path(str(checkpoint)).expanduser().is_file())


def check_options(cfg: DictConfig) -> None:
    """Counts, ranges, and numbers typed as text on the command line (inside a Hydra run)."""
    check_counts(cfg)
    check_ranges(cfg)
    check_fsdp_combinations(cfg)
    check_half_precision(cfg)
    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    task = list(hydra_cfg.overrides.task)
    check_teacher_list(task)
    values = [o for o in task if "=" in o and o.lstrip("+~").partition("=")[0] not in hydra_cfg.runtime.choices]
    if any(isinstance(OmegaConf.select(cfg, o.lstrip("+~").partition("=")[0], default=None,
                                       throw_on_resolution_failure=False), str) for o in values):
        defaults = hydra.compose(config_name="train", overrides=[o for o in task if o not in values])
        check_number_overrides(cfg, values, defaults)


def check_teacher_list(overrides: list[str]) -> None:
    """``teacher=[a,b]`` would merge the two configs into one teacher (Hydra's group list): an ensemble is
    ``teacher=ensemble`` with its members named."""
    listed = next((o for o in overrides if o.lstrip("+").startswith("teacher=[")), None)
    if listed:
        names = [n.strip() for n in listed.split("[", 1)[1].rstrip("]").split(",")]
        members = " ".join(f"teacher@teacher.members.{i}={n}" for i, n in enumerate(names))
        raise ConfigError(f"{listed} would merge those teacher configs into one teacher: for an ensemble use "
                          f"teacher=ensemble {members}")


def check_ranges(cfg: DictConfig) -> None:
    for option, (low, high, low_in, high_in, kind) in RANGES.items():
        value = OmegaConf.select(cfg, option, default=None, throw_on_resolution_failure=False)
        if value is None or isinstance(value, str):
            continue  # text typed for a number is check_number_overrides' to refuse
        if not _is_number(value):
            raise ConfigError(f"{option}={value!r} is not a number: pass {kind}")
        inside = (low < value or (low_in and value == low)) and (value < high or (high_in and value == high))
        if not inside:
            bounds = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
            raise ConfigError(f"{option}={value} is outside {bounds}: pass {kind}")


def count_classes(cfg: DictConfig) -> None:
    """Build the data module (its constructor checks its root and class count) and write the class count into
    ``data.num_classes`` where the config lets the source count them (folders, HF): the models read it."""
    if "data" not in cfg:
        return
    datamodule = _instantiate(cfg.data)
    if "num_classes" in cfg.data:
        with open_dict(cfg):
            cfg.data.num_classes = datamodule.num_classes


def check_student(cfg: DictConfig) -> None:
    """Build the student on the meta device (no memory, no weights read): its shape checks (image size vs patch
    size, width vs heads, ...) fail here, not after a teacher was trained. Weights to start from are checked as
    files by :func:`check_paths`; hub weights (``model.pretrained``) are fetched when the run builds it."""
    if "model" not in cfg or OmegaConf.select(cfg, "model.pretrained", default=None):
        return
    model = OmegaConf.to_container(cfg.model, resolve=True)
    if "init_from" in model:
        model["init_from"] = None
    with torch.device("meta"):
        _instantiate(model)


def _instantiate(node):
    """``instantiate``, with the ConfigError a target raised as itself (Hydra wraps it)."""
    try:
        return instantiate(node)
    except Exception as exc:
        error = find_config_error(exc)
        if error is None:
            raise
        raise error from exc


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


def check_half_precision(cfg: DictConfig) -> None:
    """``trainer.precision=16-true`` keeps the weights and AdamW's moments in float16: with an ``optim.eps`` that
    float16 rounds to 0 (the default 1e-8), the first step divides by zero wherever a small gradient's second moment
    underflows, on every device: inf/nan weights after one step (measured: NaN at step 1 on the CPU)."""
    precision = str(OmegaConf.select(cfg, "trainer.precision", default=""))
    eps = OmegaConf.select(cfg, "optim.eps", default=None, throw_on_resolution_failure=False)
    if precision == "16-true" and _is_number(eps) and float(torch.tensor(eps, dtype=torch.float16)) == 0:
        raise ConfigError(f"trainer.precision=16-true keeps AdamW's moments in float16, where optim.eps={eps:g} is 0 "
                          "(the first step divides by zero): use trainer.precision=16-mixed or bf16-true, or set "
                          "optim.eps=1e-4")


def check_device_decode(cfg: DictConfig) -> None:
    """``augment.device_decode=true`` decodes with ``torchvision.io.decode_jpeg`` on the training device: libjpeg-turbo
    on the CPU, nvJPEG on CUDA, nothing on other accelerators (Apple's MPS)."""
    if not OmegaConf.select(cfg, "augment.device_decode", default=False):
        return
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="auto")).lower()
    if accelerator in ("gpu", "auto"):
        accelerator = "cuda" if torch.cuda.is_available() else (
            "mps" if torch.backends.mps.is_available() else "cpu" if accelerator == "auto" else "gpu")
    if accelerator not in ("cpu", "cuda"):
        raise ConfigError(f"augment.device_decode=true decodes JPEGs with torchvision.io.decode_jpeg, which runs on "
                          f"cpu and cuda, not on trainer.accelerator={accelerator}: use augment.device_decode=false")


def check_number_overrides(cfg: DictConfig, overrides: list[str], defaults: DictConfig) -> None:
    """``key=text`` typed where ``defaults`` (the config composed without value overrides) holds a number."""
    for override in overrides:
        key, _, _ = override.lstrip("+~").partition("=")
        default = OmegaConf.select(defaults, key, default=None)
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        if _is_number(default) and isinstance(value, str) and key not in NUMBER_OR_TEXT:
            raise ConfigError(f"{key}={value!r} is not a number (the config's default is {default}): pass a number")


def check_paths(cfg: DictConfig, skip: tuple[str, ...] = ()) -> None:
    """Weight files and the data root: present, readable, and (for weights) a checkpoint at all; not the options
    in ``skip``."""
    from deit_train.models.hf_convert import hf_weight_files, is_hf_directory

    for option in WEIGHT_FILES:
        value = OmegaConf.select(cfg, option, default=None)
        if option in skip or not value:
            continue
        path = Path(str(value)).expanduser()
        if not is_hf_directory(path):
            load_checkpoint_file(option, value)
        elif not hf_weight_files(path):
            raise ConfigError(f"{option}={path} is a save_pretrained directory (config.json) without weights (no "
                              "model.safetensors or pytorch_model.bin): save the model with its weights there, or "
                              "point the option at a weights file")
    root = OmegaConf.select(cfg, "data.root", default=None)
    if root:
        path = Path(str(root)).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data.root={path} is not a folder: check the path")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ConfigError(f"data.root={path} is not readable: check its permissions")
