"""A trained checkpoint as a usable model: its architecture, weights, class names and eval preprocessing.

Training stores the resolved ``model`` and ``data`` configs and the class names in every Lightning checkpoint
(:class:`StoreRunConfig`); checkpoints without them fall back to ``<run_dir>/.hydra/config.yaml`` beside
``<run_dir>/checkpoints/``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn

from deit_train.data.imagefolder import class_folders
from deit_train.errors import ConfigError
from deit_train.models.checkpoint import read_state_dict

CHECKPOINT_KEY = "deit_train"


def class_names_of(datamodule, num_classes: int) -> list[str]:
    """Folder names for an image folder; the class index otherwise (the digits' names are their indices)."""
    names = getattr(datamodule, "classes", None)
    return [str(c) for c in names] if names else [str(i) for i in range(num_classes)]


class StoreRunConfig(Callback):
    """Adds the resolved ``model``/``data`` configs and class names to each checkpoint, so export and predict
    need only the ``.ckpt`` file."""

    def __init__(self, cfg: DictConfig) -> None:
        self.payload = {section: OmegaConf.to_container(cfg[section], resolve=True)
                        for section in ("model", "data") if section in cfg}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        num_classes = getattr(getattr(pl_module, "student", None), "num_classes", 0)
        checkpoint[CHECKPOINT_KEY] = {**self.payload,
                                      "class_names": class_names_of(trainer.datamodule, num_classes)}


@dataclass
class Preprocessing:
    """The evaluation transform: resize the short side to ``image_size / crop_pct``, center crop, normalise."""

    image_size: int
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0
    interpolation: str = "bicubic"

    @property
    def resize_size(self) -> int:
        return math.floor(self.image_size / self.crop_pct)  # timm's eval transform rounds the same way

    def transform(self, image_size: int | None = None):
        from deit_train.data.transforms import eval_transform

        return eval_transform(image_size or self.image_size, self.mean, self.std, self.crop_pct, self.interpolation)


@dataclass
class TrainedModel:
    model: nn.Module
    model_config: dict
    class_names: list[str]
    preprocessing: Preprocessing
    source: str
    task: str = "classification"  # or "simmim": ``model`` is then a SimMIM network (encoder + pixel decoder)
    weights: str = "student"  # which of the checkpoint's weights ``model`` holds: the student's or its EMA's


def _config_beside(path: Path) -> dict:
    """``model``/``data`` of ``<run_dir>/.hydra/config.yaml`` for ``<run_dir>/checkpoints/<name>.ckpt``."""
    hydra_cfg = path.resolve().parent.parent / ".hydra" / "config.yaml"
    if not hydra_cfg.is_file():
        raise ConfigError(f"checkpoint {path} carries no run config and {hydra_cfg} does not exist: "
                          "pass a checkpoint written by `python -m deit_train` (inside its run directory)")
    cfg = OmegaConf.load(hydra_cfg)
    try:
        meta = {section: OmegaConf.to_container(cfg[section], resolve=True) for section in ("model", "data")}
    except Exception as exc:  # an interpolation into Hydra's runtime config cannot resolve outside a run
        raise ConfigError(f"cannot resolve the model/data config in {hydra_cfg}: {exc}") from exc
    root = meta["data"].get("root")
    if root and (Path(root).expanduser() / "train").is_dir():  # an image folder's classes are its folder names
        meta["class_names"] = class_folders(Path(root).expanduser() / "train")
    return meta


def read_run_config(path: str | Path) -> dict:
    """``{"model": ..., "data": ..., "class_names": ...}`` for a Lightning checkpoint of this project."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt={path} does not exist: pass a .ckpt from <run_dir>/checkpoints/")
    try:  # memory-mapped: only the small config is read from a checkpoint that may hold optimizer state
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise ConfigError(f"cannot read ckpt={path}: {type(exc).__name__}: {exc}") from exc
    meta = checkpoint.get(CHECKPOINT_KEY) if isinstance(checkpoint, dict) else None
    return dict(meta) if meta else _config_beside(path)


def preprocessing_from(data: dict, image_size: int) -> Preprocessing:
    if isinstance(data.get("source"), dict):  # SimMIM wraps a data source; its eval side is the source's
        data = {**data["source"], **{k: v for k, v in data.items() if v is not None and k != "source"}}
    return Preprocessing(image_size=int(data.get("image_size") or image_size),
                         mean=tuple(data.get("mean") or Preprocessing.mean),
                         std=tuple(data.get("std") or Preprocessing.std),
                         crop_pct=float(data.get("crop_pct") or 1.0),
                         interpolation=str(data.get("interpolation") or "bicubic"))


def build_model(model_config: dict, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The student the config describes, without pretrained or init_from loading (weights come next)."""
    cfg = {**model_config, "num_classes": num_classes}
    cfg.update({k: None for k in ("init_from",) if k in cfg})
    if "pretrained" in cfg:
        cfg["pretrained"] = None if cfg["_target_"].endswith("create_deit") else False
    if image_size is not None and "image_size" in cfg:
        cfg["image_size"] = image_size
    return instantiate(cfg)


def _num_classes(state: dict, model_config: dict) -> int:
    if "head.weight" in state:
        return state["head.weight"].shape[0]
    return int(model_config.get("num_classes") or 0)


def load_trained_model(path: str | Path, image_size: int | None = None, weights: str = "student") -> TrainedModel:
    """The student of a Lightning checkpoint, in eval mode. ``image_size`` rebuilds it for another resolution
    (position embeddings interpolated); ``weights="ema"`` loads the EMA the run kept instead of the student."""
    meta = read_run_config(path)
    model_config, data = meta.get("model") or {}, meta.get("data") or {}
    if "_target_" not in model_config:
        raise ConfigError(f"checkpoint {path} has no model config with _target_")
    state = read_state_dict(path, weights)
    num_classes = _num_classes(state, model_config)
    if "mask_token" in state:
        return _load_simmim(path, state, model_config, num_classes, data, meta)
    if image_size is not None and image_size != model_config.get("image_size", image_size):
        from deit_train.models.checkpoint import load_student_weights

        model = build_model(model_config, num_classes, image_size)
        load_student_weights(model, path, weights=weights)
    else:
        model = build_model(model_config, num_classes)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"checkpoint {path} does not fit its own model config: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    class_names = list(meta.get("class_names") or [str(i) for i in range(num_classes)])
    preprocessing = preprocessing_from(data, int(model_config.get("image_size") or 224))
    if image_size is not None:
        preprocessing.image_size = image_size
    return TrainedModel(model.eval(), model_config, class_names, preprocessing, str(path), weights=weights)


def _load_simmim(path, state: dict, model_config: dict, num_classes: int, data: dict, meta: dict) -> TrainedModel:
    """A SimMIM pretraining checkpoint: the encoder with its mask token and pixel decoder."""
    from deit_train.models.simmim import SimMIM

    network = SimMIM(build_model(model_config, num_classes))
    own = {("" if k.startswith(("mask_token", "decoder.")) else "encoder.") + k: v for k, v in state.items()}
    missing, unexpected = network.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise ConfigError(f"SimMIM checkpoint {path} does not fit its own model config: missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}")
    preprocessing = preprocessing_from(data, int(model_config.get("image_size") or 224))
    return TrainedModel(network.eval(), model_config, list(meta.get("class_names") or []), preprocessing,
                        str(path), task="simmim")
