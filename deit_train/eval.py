"""Evaluate a DeiT/ViT classifier file the way the paper's tables were measured:
``python -m deit_train.eval ckpt=<file or directory> [data=imagefolder data.root=<imagenet>] [model=deit_small]``.

``ckpt``: a checkpoint of this framework (architecture, data set and preprocessing from its stored config), an
official DeiT ``.pth`` or a timm state dict (architecture from ``model=``; the distillation token and class count
from the file), a timm hub directory or a transformers DeiT/ViT directory (architecture from its config.json); see
:mod:`deit_train.run.any_checkpoint`. ``data=<name>`` picks the data set (configs/data; required unless the
checkpoint is ours), ``data.<key>=...`` changes a key: e.g. ``data.mean=[0.5,0.5,0.5]`` replaces the preprocessing's
mean. Preprocessing: the file's own where it has one, else the paper's (resize 256/224, bicubic, center crop,
ImageNet mean/std); the line printed first says which.

Scored on ``split=test`` (``split=val`` for the validation split; ImageNet-layout folders test on their validation
split): top-1/top-5 of the prediction (the average of both heads' logits for a distilled model, as the official
``evaluate``) and of each head, the prediction's cross-entropy (``<split>/ce``), the head disagreements, and the
images/s of the forward passes (``<split>/throughput``), under training's ``results.json`` names. ``out=<file>.json``
writes them; with 100 classes or fewer also ``<file>.confusion.png``, the prediction's confusion matrix.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.nn import functional as F
from torchmetrics.classification import MulticlassConfusionMatrix

from deit_train.errors import ConfigError, one_line_errors
from deit_train.models.deit import average_heads, forward_heads
from deit_train.modules.metrics import EvalMetrics
from deit_train.run.any_checkpoint import EvalModel, load_for_eval
from deit_train.run.cli import parse_args
from deit_train.run.environment import freeze_imported_objects
from deit_train.run.trained_model import Preprocessing

USAGE = """usage: python -m deit_train.eval ckpt=<file or directory> [data=<name> data.root=<dir>] [model=<size>]
  [split=test|val] [data.<key>=<value> ...] [model.<key>=<value> ...] [batch_size=<data's>] [out=metrics.json]
  [device=auto|cpu|cuda] [weights=student|ema]
  ckpt: a .ckpt of this framework, an official DeiT .pth, a timm file or directory, a transformers directory;
  model= (deit_tiny, deit_small, deit_base, ...) for files that do not say their architecture"""
DEFAULTS = {"ckpt": None, "split": "test", "data": {}, "model": {}, "batch_size": None, "out": None, "device": "auto",
            "weights": "student"}
SPLITS = ("test", "val")
GROUPS = ("data", "model")  # `data=<name>` / `model=<name>` pick a config file of configs/<group>/
CONFUSION_MAX_CLASSES = 100
# data config keys that carry the eval preprocessing
_PREPROCESSING_KEYS = ("image_size", "mean", "std", "crop_pct", "interpolation")


@dataclass
class EvalReport:
    metrics: dict[str, float]
    confusion: torch.Tensor | None  # (classes, classes): rows true class, columns predicted
    class_names: list[str]
    summary: str  # what was evaluated how: format, architecture, data, preprocessing and its source


def compose_group(group: str, choice: str, overrides: dict | None = None, model_choice: str | None = None) -> dict:
    """``configs/<group>/<choice>.yaml`` resolved in the root config (``model=`` chooses the model its
    interpolations read), with ``<group>.<key>`` overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from deit_train.run.config import CONFIG_DIR

    choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    if choice not in choices:
        raise ConfigError(f"{group}={choice} is not a config: pick one of {', '.join(choices)}")
    selection = [f"{group}={choice}"] + ([f"model={model_choice}"] if model_choice and group != "model" else [])
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=selection)
    except HydraException as exc:
        raise ConfigError(f"{group}={choice}: {exc}".splitlines()[0]) from exc
    OmegaConf.set_struct(cfg, False)
    cfg[group] = OmegaConf.merge(cfg[group], overrides or {})
    try:
        return OmegaConf.to_container(cfg[group], resolve=True)
    except ConfigError:
        raise
    except Exception as exc:  # an override an interpolation cannot take
        raise ConfigError(f"{group}={choice}: {exc}".splitlines()[0]) from exc


def data_config_for(loaded: EvalModel, data: str | None, data_overrides: dict, model_choice: str | None,
                    ckpt: Path) -> tuple[dict, list[str]]:
    """The data set's config with the model's preprocessing set (the user's ``data.<key>`` still win), and the
    preprocessing keys the user set."""
    if data is None:
        if loaded.data_config is None:
            raise ConfigError(f"data is not set: ckpt={ckpt} carries no data set; pass data=imagefolder "
                              "data.root=<imagenet> (or another configs/data name)")
        config = dict(loaded.data_config)
        if "_target_" not in config:
            raise ConfigError(f"ckpt={ckpt} stores no data config: pass the data set as data=<name> data.root=...")
    else:
        config = compose_group("data", data, None, model_choice)
    pre = loaded.preprocessing
    wanted = {"image_size": pre.image_size, "mean": list(pre.mean), "std": list(pre.std), "crop_pct": pre.crop_pct,
              "interpolation": pre.interpolation}
    for key in _PREPROCESSING_KEYS:
        if key in config or key in ("mean", "std"):
            config[key] = wanted[key]
    config.update(data_overrides)
    return config, [k for k in _PREPROCESSING_KEYS if k in data_overrides]


def describe_preprocessing(config: dict) -> str:
    """What the data module's eval transform does with these keys."""
    mean = ", ".join(f"{v:g}" for v in config["mean"])
    std = ", ".join(f"{v:g}" for v in config["std"])
    if "crop_pct" not in config:  # in-memory sources (digits) resize whole images to image_size
        return f"whole image resized to {config['image_size']} px, mean ({mean}), std ({std})"
    pre = Preprocessing(image_size=int(config["image_size"]), crop_pct=float(config["crop_pct"]))
    return (f"resize short side to {pre.resize_size} {config.get('interpolation', 'bicubic')}, center crop "
            f"{config['image_size']}, mean ({mean}), std ({std})")


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} but CUDA is not available: pass device=cpu (or device=auto)")
    return torch.device(device)


@torch.no_grad()
def score(ckpt: str | Path, split: str = "test", data_overrides: dict | None = None, batch_size: int | None = None,
          device: str = "auto", data: str | None = None, model: str | None = None,
          model_overrides: dict | None = None, weights: str = "student") -> EvalReport:
    """Evaluate ``ckpt`` on ``split`` of the data set: the metrics, the confusion matrix and the summary line.
    ``weights="ema"`` scores the EMA of the student the checkpoint keeps (:func:`load_for_eval`)."""
    if split not in SPLITS:
        raise ConfigError(f"split={split} is not one of {', '.join(SPLITS)}")
    ckpt = Path(ckpt).expanduser()
    model_overrides = dict(model_overrides or {})
    if model_overrides and model is None:
        raise ConfigError("model.<key> options need model=<size> to change (e.g. model=deit_small "
                          f"model.image_size=384): got {', '.join(f'model.{k}' for k in model_overrides)}")
    model_config = compose_group("model", model, model_overrides) if model else None
    loaded = load_for_eval(ckpt, model_config, model, weights)
    data_overrides = dict(data_overrides or {})
    data_config, overridden = data_config_for(loaded, data, data_overrides, model, ckpt)
    if batch_size is not None:
        data_config["batch_size"] = batch_size
    target_device = _device(device)
    if "pin_memory" in data_config and "pin_memory" not in data_overrides:  # pinning helps only a GPU copy
        data_config["pin_memory"] = target_device.type == "cuda"
    datamodule = instantiate(data_config)
    if datamodule.num_classes != loaded.num_classes:
        raise ConfigError(f"ckpt={ckpt} has {loaded.num_classes} classes, data={data or 'its stored data set'} has "
                          f"{datamodule.num_classes}: evaluate it on the data set it was trained for (data=..., "
                          "data.root=...)")
    datamodule.setup("test" if split == "test" else "validate")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    network = loaded.model.to(target_device)
    distilled = "dist" in loaded.heads
    metrics = EvalMetrics(split, loaded.num_classes, distilled, with_teacher=False).to(target_device)
    confusion = (MulticlassConfusionMatrix(loaded.num_classes).to(target_device)
                 if loaded.num_classes <= CONFUSION_MAX_CLASSES else None)
    cross_entropy, images_seen, model_seconds = 0.0, 0, 0.0
    for images, target in loader:
        images, target = images.to(target_device, non_blocking=True), target.to(target_device)
        _synchronize(target_device)
        started = time.perf_counter()
        cls, dist = forward_heads(network, images)
        _synchronize(target_device)
        model_seconds += time.perf_counter() - started
        dist = dist if distilled else None  # DeiTForImageClassification: the class token's head only
        metrics.update(target, cls, dist, None)
        prediction = average_heads(cls, dist)
        cross_entropy += F.cross_entropy(prediction.float(), target, reduction="sum").item()
        images_seen += len(target)
        if confusion is not None:
            confusion.update(prediction, target)
    if images_seen == 0:
        raise ConfigError(f"split={split} of the data set has no images: check data.root / the split's folder")
    result = {name: float(metric.compute()) for name, metric in metrics.loggable().items()}
    result[f"{split}/ce"] = cross_entropy / images_seen
    result[f"{split}/throughput"] = images_seen / max(model_seconds, 1e-9)
    result[f"{split}/images"] = images_seen
    names = getattr(datamodule, "classes", None) or loaded.class_names or [str(i) for i in range(loaded.num_classes)]
    source = loaded.preprocessing_source + (f"; from the command line: {', '.join('data.' + k for k in overridden)}"
                                            if overridden else "")
    summary = (f"eval: ckpt={ckpt} ({loaded.kind}; architecture: {loaded.architecture}; heads: "
               f"{'+'.join(loaded.heads)}; weights: {weights}) "
               f"on data={data or data_config['_target_'].rsplit('.', 1)[-1]} "
               f"split={split} ({images_seen} images)\n"
               f"preprocessing: {source}: {describe_preprocessing(data_config)}"
               + (f"\nnote: {loaded.preprocessing_note}" if loaded.preprocessing_note else ""))
    return EvalReport(result, confusion.compute().cpu() if confusion is not None else None, list(map(str, names)),
                      summary)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # time the kernels, not their launch
        torch.cuda.synchronize(device)


def evaluate(ckpt: str | Path, split: str = "test", data_overrides: dict | None = None, batch_size: int | None = None,
             device: str = "auto", data: str | None = None, model: str | None = None,
             model_overrides: dict | None = None, weights: str = "student") -> dict[str, float]:
    """``{"<split>/top1": ..., "<split>/top5": ..., "<split>/top1_cls": ..., "<split>/ce": ..., ...}``."""
    return score(ckpt, split, data_overrides, batch_size, device, data, model, model_overrides, weights).metrics


def plot_confusion(confusion: torch.Tensor, class_names: Sequence[str], out: Path, title: str) -> Path:
    """The confusion matrix as a PNG (counts written in the cells for up to 20 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deit_train.run.plots import save_figure

    metric = MulticlassConfusionMatrix(len(class_names))
    size = max(5.0, 0.18 * len(class_names))

    fig, ax = plt.subplots(figsize=(size, size))
    with warnings.catch_warnings():  # matplotlib converting torchmetrics' tensor: numpy 2's copy= notice
        warnings.simplefilter("ignore", DeprecationWarning)
        metric.plot(confusion, ax=ax, add_text=len(class_names) <= 20, labels=list(class_names))
    ax.set_title(title)
    return save_figure(fig, out)


def split_group_choices(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``data=<name>`` / ``model=<name>`` (a config of that group) apart from the other ``key=value`` items."""
    choices, rest = {}, []
    for arg in argv:
        key, _, value = arg.removeprefix("--").partition("=")
        if key in GROUPS and value:
            choices[key] = value
        else:
            rest.append(arg)
    return choices, rest


def main(argv: Sequence[str] | None = None) -> None:
    freeze_imported_objects()
    with one_line_errors():
        choices, rest = split_group_choices(sys.argv[1:] if argv is None else argv)
        cfg: DictConfig = parse_args(DEFAULTS, rest, USAGE)
        if not cfg.ckpt:
            raise ConfigError(f"ckpt is not set: pass ckpt=<checkpoint file or directory>\n{USAGE}")
        report = score(cfg.ckpt, cfg.split, OmegaConf.to_container(cfg.data, resolve=True), cfg.batch_size,
                       cfg.device, choices.get("data"), choices.get("model"),
                       OmegaConf.to_container(cfg.model, resolve=True), cfg.weights)
        print(report.summary, file=sys.stderr)
        payload = {"ckpt": str(cfg.ckpt), "weights": cfg.weights, "summary": report.summary, **report.metrics}
        if cfg.out:
            out = Path(cfg.out).expanduser()
            out.parent.mkdir(parents=True, exist_ok=True)
            if report.confusion is not None:
                png = out.with_name(out.stem + ".confusion.png")
                payload["confusion_matrix"] = str(plot_confusion(report.confusion, report.class_names, png,
                                                                 f"{Path(cfg.ckpt).name}: {cfg.split}"))
            out.write_text(json.dumps(payload, indent=2, sort_keys=True))
        print(json.dumps(payload, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
