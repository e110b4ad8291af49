"""Any DeiT/ViT classifier file as a model to evaluate: a Lightning checkpoint of this project, an official DeiT
``.pth`` (``model`` key) or a timm state dict, a timm hub directory (config.json with ``architecture`` and
``pretrained_cfg``) or a transformers ``save_pretrained`` directory (DeiTForImageClassificationWithTeacher,
DeiTForImageClassification, ViTForImageClassification).

The weights are read by the readers ``model.init_from`` uses (:func:`deit_train.models.checkpoint.read_state_dict`,
:mod:`deit_train.models.hf_convert`) and loaded exactly (:func:`load_exact`: nothing resampled, no head made up).
The architecture comes from the file where it says (transformers config.json, timm config.json, our stored config),
else from the ``model`` config the caller composed (``model=deit_small``). The eval preprocessing comes from the
file's own config where it has one (our stored data config, timm ``pretrained_cfg``, transformers
``preprocessor_config.json``), else it is the paper's: short side to 256/224 of the input size, bicubic, center
crop, ImageNet mean/std.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.models.checkpoint import check_weights, load_exact, read_state_dict
from deit_train.models.deit import create_deit, is_distilled
from deit_train.models.hf_convert import is_hf_directory, read_hf_config
from deit_train.run.trained_model import CHECKPOINT_KEY, Preprocessing, build_model, load_trained_model, read_run_config

PAPER_CROP_PCT = 0.875  # DeiT's eval: resize to 256/224 of the input size, then center crop (main.py, all sizes)
HF_CLASSIFIERS = ("DeiTForImageClassificationWithTeacher", "DeiTForImageClassification", "ViTForImageClassification")
_PIL_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_VIT_KEYS = ("patch_embed.proj.weight", "pos_embed", "cls_token", "blocks.0.attn.qkv.weight")


def paper_preprocessing(image_size: int) -> Preprocessing:
    return Preprocessing(image_size=image_size, mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD),
                         crop_pct=PAPER_CROP_PCT, interpolation="bicubic")


@dataclass
class EvalModel:
    """A network in eval mode and how to read and feed it."""

    model: nn.Module
    heads: tuple[str, ...]  # ("cls",) or ("cls", "dist"): the heads the file holds (the prediction averages them)
    kind: str  # which format the file is in
    architecture: str  # where the architecture came from
    preprocessing: Preprocessing
    preprocessing_source: str  # where the preprocessing came from: "paper", "<file> pretrained_cfg", ...
    preprocessing_note: str = ""
    class_names: list[str] | None = None
    data_config: dict | None = None  # a Lightning checkpoint's own data set

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)


def checkpoint_kind(path: Path) -> str:
    """``lightning``, ``state_dict``, ``timm_dir`` or ``transformers_dir`` (one line when it is none of them)."""
    if path.is_file() and path.name in _WEIGHT_FILES and is_hf_directory(path.parent):
        path = path.parent  # a hub directory's weights file: its config.json says the rest
    if path.is_dir():
        if not is_hf_directory(path):
            raise ConfigError(f"ckpt={path} is a directory without config.json: pass a checkpoint file, or a timm / "
                              "transformers directory written by save_pretrained")
        config = read_hf_config(path)
        return "timm_dir" if "architecture" in config and "model_type" not in config else "transformers_dir"
    if not path.is_file():
        raise ConfigError(f"ckpt={path} does not exist: pass a checkpoint file or a timm / transformers directory")
    if path.suffix == ".safetensors":
        return "state_dict"
    try:  # memory-mapped: only the top-level keys are looked at here
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # files torch saved before its zip format cannot be memory-mapped
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # torch raises many types for a damaged or foreign file
            raise ConfigError(f"cannot read ckpt={path}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    if isinstance(checkpoint, dict) and (CHECKPOINT_KEY in checkpoint or "pytorch-lightning_version" in checkpoint):
        return "lightning"
    return "state_dict"


def load_for_eval(ckpt: str | Path, model_config: dict | None = None, model_choice: str | None = None,
                  weights: str = "student") -> EvalModel:
    """The network in ``ckpt`` (any format above). ``model_config`` (a resolved ``model`` group config,
    ``model_choice`` its name for messages) is the architecture of files that do not say theirs. ``weights="ema"``:
    the EMA a training run kept (ours, the official DeiT's ``model_ema``, timm's ``state_dict_ema``)."""
    check_weights(weights)
    path = Path(ckpt).expanduser()
    kind = checkpoint_kind(path)
    if path.is_file() and kind.endswith("_dir"):
        path = path.parent
    if kind != "state_dict" and model_config is not None:
        where = "its stored run config" if kind == "lightning" else f"{path / 'config.json'}"
        raise ConfigError(f"model={model_choice} does not apply: ckpt={path} says its architecture ({where}); "
                          "drop model= and model.* options")
    if kind.endswith("_dir") and weights == "ema":
        raise ConfigError(f"weights=ema: ckpt={path} is a {kind.split('_')[0]} directory, which holds one set of "
                          "weights (an export of the EMA holds the EMA): use weights=student")
    if kind == "lightning":
        return _lightning(path, weights)
    if kind == "timm_dir":
        return _timm_directory(path)
    if kind == "transformers_dir":
        return _transformers_directory(path)
    return _state_dict_file(path, model_config, model_choice, weights)


def _read(path: Path, weights: str = "student") -> dict[str, Tensor]:
    try:
        return read_state_dict(path, weights)
    except ConfigError as exc:
        raise ConfigError(f"ckpt={path}: {exc}") from exc


def _require_classifier(state: dict[str, Tensor], path: Path) -> None:
    if not all(k in state for k in _VIT_KEYS):
        raise ConfigError(f"ckpt={path} holds no DeiT/ViT weights (no {', '.join(k for k in _VIT_KEYS if k not in state)}"
                          "): pass an official DeiT .pth, a timm DeiT/ViT file or directory, a transformers DeiT/ViT "
                          "directory or a checkpoint of this framework")
    if "head.weight" not in state:
        raise ConfigError(f"ckpt={path} holds a DeiT/ViT backbone without a classifier (no head.weight): evaluate a "
                          "fine-tuned classifier (model.init_from=<it> trains one)")


def _heads(state: dict[str, Tensor]) -> tuple[str, ...]:
    return ("cls", "dist") if "head_dist.weight" in state else ("cls",)


_SIZE_HINT = ("set model= to the size the file was trained as (deit_tiny, deit_small, deit_base, deit_base_384) or "
              "model.hidden_size/patch_size/mlp_ratio/num_hidden_layers/image_size")


def _state_dict_file(path: Path, model_config: dict | None, model_choice: str | None, weights: str) -> EvalModel:
    state = _read(path, weights)
    _require_classifier(state, path)
    if model_config is None:
        from deit_train.run.config import CONFIG_DIR

        sizes = sorted(p.stem for p in (CONFIG_DIR / "model").glob("deit_*.yaml"))
        raise ConfigError(f"ckpt={path} is a state dict that does not say its architecture: pass model=<size> "
                          f"({', '.join(sizes)}) as it was trained")
    distilled = "dist_token" in state  # the file says whether it has a distillation token, and its class count
    model = build_model({**model_config, "distilled": distilled}, int(state["head.weight"].shape[0]))
    heads = _heads(state)
    load_exact(model, state, f"ckpt={path}", _SIZE_HINT, may_lack=() if "dist" in heads else ("head_dist.",))
    size = int(model_config.get("image_size") or 224)
    return EvalModel(model.eval(), heads, "state dict (official DeiT / timm)",
                     f"model={model_choice}" + (" (distilled: the file has a distillation token)" if distilled else ""),
                     paper_preprocessing(size), "paper")


def _lightning(path: Path, weights: str) -> EvalModel:
    trained = load_trained_model(path, weights=weights)
    if trained.task != "classification":
        raise ConfigError(f"ckpt={path} is a SimMIM pretraining checkpoint: it has no classifier to evaluate; "
                          "evaluate a fine-tuned one")
    heads = ("cls", "dist") if is_distilled(trained.model) else ("cls",)
    return EvalModel(trained.model, heads, "Lightning checkpoint of this framework", "its stored run config",
                     trained.preprocessing, "its stored data config", class_names=trained.class_names,
                     data_config=dict(read_run_config(path).get("data") or {}))


def _timm_directory(path: Path) -> EvalModel:
    import timm

    config = read_hf_config(path)
    try:  # timm's own reading of its config.json (architecture, model_args, pretrained_cfg); weights come next
        model = timm.create_model(f"local-dir:{path}", pretrained=False)
    except Exception as exc:  # an unknown architecture name or arguments it does not take
        raise ConfigError(f"ckpt={path}: timm cannot build architecture {config.get('architecture')!r} from its "
                          f"config.json ({type(exc).__name__}: {exc})".splitlines()[0]) from exc
    if not isinstance(model, VisionTransformer):
        raise ConfigError(f"ckpt={path} holds a timm {config.get('architecture')} ({type(model).__name__}), not a "
                          "DeiT/ViT: pass a DeiT/ViT checkpoint")
    state = _read(path)
    _require_classifier(state, path)
    heads = _heads(state)
    load_exact(model, state, f"ckpt={path}", f"the weights do not fit {path / 'config.json'}'s architecture",
               may_lack=() if "dist" in heads else ("head_dist.",))
    cfg = model.pretrained_cfg
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    preprocessing = Preprocessing(image_size=size, mean=tuple(cfg.get("mean") or IMAGENET_DEFAULT_MEAN),
                                  std=tuple(cfg.get("std") or IMAGENET_DEFAULT_STD),
                                  crop_pct=float(cfg.get("crop_pct") or PAPER_CROP_PCT),
                                  interpolation=str(cfg.get("interpolation") or "bicubic"))
    note = ""
    if cfg.get("crop_mode", "center") != "center":
        note = f"pretrained_cfg crop_mode={cfg['crop_mode']}: this eval resizes the short side and center-crops"
    labels = config.get("label_names") or cfg.get("label_names")
    return EvalModel(model.eval(), heads, "timm directory", f"{path / 'config.json'} ({config['architecture']})",
                     preprocessing, f"{path / 'config.json'} pretrained_cfg", note,
                     class_names=list(labels) if labels else None)


def _transformers_directory(path: Path) -> EvalModel:
    config = read_hf_config(path)
    hf_class = (config.get("architectures") or ["?"])[0]
    if config.get("model_type") not in ("deit", "vit"):
        raise ConfigError(f"ckpt={path} holds a transformers '{config.get('model_type')}' model: only DeiT/ViT "
                          f"directories can be evaluated ({', '.join(HF_CLASSIFIERS)})")
    if hf_class not in HF_CLASSIFIERS:
        raise ConfigError(f"ckpt={path} holds a transformers {hf_class}, not a classifier: evaluate a directory of "
                          f"{', '.join(HF_CLASSIFIERS)}")
    if not any((path / f).is_file() for f in _WEIGHT_FILES) and not list(path.glob("model*.safetensors")):
        raise ConfigError(f"ckpt={path} is a transformers directory without weights (config.json but no "
                          "model.safetensors or pytorch_model.bin): save the model with save_pretrained into it")
    state = _read(path)
    _require_classifier(state, path)
    image = config.get("image_size", 224)
    patch = config.get("patch_size", 16)
    if isinstance(image, (list, tuple)) or isinstance(patch, (list, tuple)):
        image, patch = _square(image, path, "image_size"), _square(patch, path, "patch_size")
    hidden = int(config.get("hidden_size", 768))
    # transformers' DeiT always puts a distillation token into the sequence; DeiTForImageClassification reads
    # only the class token's head
    model = create_deit(image_size=int(image), patch_size=int(patch), hidden_size=hidden,
                        num_hidden_layers=int(config.get("num_hidden_layers", 12)),
                        num_attention_heads=int(config.get("num_attention_heads", 12)),
                        mlp_ratio=int(config.get("intermediate_size", 4 * hidden)) / hidden,
                        qkv_bias=bool(config.get("qkv_bias", True)),
                        layer_norm_eps=float(config.get("layer_norm_eps", 1e-12)),
                        num_channels=int(config.get("num_channels", 3)),
                        num_classes=int(state["head.weight"].shape[0]), distilled=config["model_type"] == "deit")
    heads = _heads(state)
    load_exact(model, state, f"ckpt={path}", f"the weights do not fit {path / 'config.json'}",
               may_lack=() if "dist" in heads else ("head_dist.",))
    preprocessing, source, note = transformers_preprocessing(path, int(image))
    labels = config.get("id2label")
    names = [labels[str(i)] for i in range(len(labels))] if labels and len(labels) == model.num_classes else None
    return EvalModel(model.eval(), heads, f"transformers {hf_class} directory", f"{path / 'config.json'}",
                     preprocessing, source, note, class_names=names)


def _square(value, path: Path, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"ckpt={path}: config.json {key}={list(value)} is not square; DeiT models here are")
        return int(value[0])
    return int(value)


def transformers_preprocessing(path: Path, image_size: int) -> tuple[Preprocessing, str, str]:
    """``preprocessor_config.json`` as transformers' DeiT/ViT image processors read it (an int ``size`` is a
    square, ViT's processor does not crop), in the terms of this framework's eval transform."""
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return paper_preprocessing(image_size), f"paper ({path} has no preprocessor_config.json)", ""
    cfg = json.loads(file.read_text())
    kind = cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or ""
    vit = kind.startswith("ViT")
    if not kind.startswith(("DeiT", "ViT")):
        raise ConfigError(f"ckpt={path}: {file.name} describes a {kind or 'unnamed'} processor; only DeiT/ViT image "
                          "processors are read: set data.image_size/crop_pct/interpolation/mean/std instead")
    size = cfg.get("size", {"height": 224, "width": 224} if vit else {"height": 256, "width": 256})
    crop_on = cfg.get("do_center_crop", not vit)
    crop = cfg.get("crop_size", {"height": 224, "width": 224}) if crop_on else None
    if not cfg.get("do_resize", True):
        raise ConfigError(f"ckpt={path}: {file.name} has do_resize=false: set data.image_size/crop_pct to evaluate")
    note = ""
    if isinstance(size, dict) and "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    else:
        height, width = (int(size), int(size)) if not isinstance(size, dict) else (int(size["height"]),
                                                                                    int(size["width"]))
        resize = min(height, width)
        note = (f"transformers resizes every image to {height}x{width} (aspect ratio not kept); this eval resizes "
                f"the short side to {resize}, as the paper's does")
    side = int(crop if not isinstance(crop, dict) else min(crop["height"], crop["width"])) if crop else resize
    mean = cfg.get("image_mean", [0.5] * 3 if vit else list(IMAGENET_DEFAULT_MEAN)) if cfg.get("do_normalize", True) \
        else [0.0] * 3
    std = cfg.get("image_std", [0.5] * 3 if vit else list(IMAGENET_DEFAULT_STD)) if cfg.get("do_normalize", True) \
        else [1.0] * 3
    preprocessing = Preprocessing(image_size=side, mean=tuple(mean), std=tuple(std), crop_pct=side / resize,
                                  interpolation=_PIL_NAMES.get(int(cfg.get("resample", 3)), "bicubic"))
    if side != image_size:
        raise ConfigError(f"ckpt={path}: {file.name} crops to {side} px, the model takes {image_size} px: fix the "
                          "preprocessor config or set data.image_size")
    return preprocessing, str(file), note
