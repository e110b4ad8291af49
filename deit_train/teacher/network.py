"""The frozen teacher: a timm classifier (RegNetY-160 in the paper) that never trains, run lean.

Lean means: BatchNorm folded into the convolutions once at load (exact for a frozen network up to rounding),
weights and inputs in ``channels_last``, forward under ``torch.inference_mode()`` in its own precision
(``teacher.precision``, independent of the student's ``trainer.precision``), optionally ``torch.compile``d;
its logits reach the loss in fp32 whatever it ran in.

The teacher's identity travels with its file (:func:`teacher_file`): architecture, normalisation,
input resolution and interpolation, class names in label order. The teacher uses them whatever the data config
says; an explicit ``teacher.mean/std/image_size`` still wins.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import BatchNormAct2d, ConvNormAct
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deit_train.errors import ConfigError
from deit_train.models.checkpoint import read_state_dict
from deit_train.teacher.identity import TeacherIdentity, read_teacher_identity, state_sha256, suggest_architecture

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CLASS_ORDERS = ("strict", "match")


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every timm ``ConvNormAct``'s BatchNorm into its convolution (eval statistics); returns how many.

    ``BatchNormAct2d`` keeps its activation (and drop) after the fold.
    """
    folded = 0
    for module in model.modules():
        if isinstance(module, ConvNormAct) and isinstance(module.conv, nn.Conv2d) \
                and isinstance(module.bn, nn.BatchNorm2d) and module.bn.track_running_stats:
            module.conv = fuse_conv_bn_eval(module.conv.eval(), module.bn.eval())
            module.bn = nn.Sequential(module.bn.drop, module.bn.act) if isinstance(module.bn, BatchNormAct2d) \
                else nn.Identity()
            folded += 1
    return folded


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 in hardware: a CUDA GPU with bf16 (Ampere+), a CPU with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def device_runs(precision: str, device: torch.device) -> bool:
    """Whether ``device`` computes ``precision`` at all (a CPU emulates bf16/fp16; old GPUs have no bf16)."""
    if precision == "bf16" and device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return True


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> bf16 where the device runs it fast, else fp32; an explicit choice is checked."""
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if not device_runs(precision, device):
        raise ConfigError(f"teacher.precision={precision}: this {device.type} device has no {precision}; "
                          "use teacher.precision=auto (picks the fastest it has), fp32 or fp16")
    return precision


class FrozenTeacher(nn.Module):
    """A timm model in eval mode for the whole run, without gradients, outside the optimizer, run lean.

    ``trainer.fit`` calls ``.train()`` on the LightningModule; :meth:`train` refuses, so dropout stays off.

    Args:
        model_name: timm architecture, e.g. ``regnety_160``.
        checkpoint: local weights (plain state dict, timm file, official DeiT teacher file with a ``model``
            key, a teacher file or checkpoint of this project). The class count is read from the file.
        pretrained: load timm hub weights instead (needs network access); ``true`` means the DeiT paper's
            ``<model_name>.deit_in1k`` weights where timm has them, a string names the tag/weights.
        num_classes: class count when neither checkpoint nor hub weights say it (default 1000).
        mean, std: the normalisation the teacher was trained with (default: the teacher file's, else its timm
            pretrained config: ImageNet's).
        input_mean, input_std: the normalisation of the images it receives (the student's); when they
            differ from ``mean``/``std`` the input is re-normalised.
        image_size: the resolution the teacher sees; the student's batch is resized (antialiased) to it.
            Default: the teacher file's (or the hub weights') training resolution, else the student's.
        interpolation: resize mode (default: the teacher file's, else bicubic).
        precision: ``auto`` (bf16 where the device runs it fast, else fp32), ``fp32``, ``bf16``, ``fp16``.
        compile: ``torch.compile`` the teacher forward.
        lean: fold BatchNorm and run ``channels_last`` (default); ``false`` runs the network as loaded, NCHW
            (the pre-lean teacher, for benchmarks and debugging).
        class_order: when teacher and data both know their class names and the order differs: ``strict``
            stops, ``match`` reorders the teacher's outputs to the data's order.
        min_val_top1: the teacher's top-1 on the first validation batches (Lightning's sanity check) must reach
            this, else the run stops (default: twice chance).
    """

    def __init__(
        self,
        model_name: str,
        checkpoint: str | None = None,
        pretrained: bool | str = False,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        image_size: int | None = None,
        interpolation: str | None = None,
        precision: str = "auto",
        compile: bool = False,
        lean: bool = True,
        class_order: str = "strict",
        min_val_top1: float | None = None,
    ) -> None:
        super().__init__()
        if precision not in ("auto", *PRECISIONS):
            raise ConfigError(f"teacher.precision={precision} is not one of auto, {', '.join(PRECISIONS)}")
        if class_order not in CLASS_ORDERS:
            raise ConfigError(f"teacher.class_order={class_order} is not one of {', '.join(CLASS_ORDERS)}")
        if not checkpoint and not pretrained:
            raise ConfigError(
                "teacher has no weights: set teacher.checkpoint=/path/to/teacher.pth (or teacher.pretrained=true online)"
            )
        state = read_state_dict(checkpoint) if checkpoint else None
        identity = read_teacher_identity(checkpoint) if checkpoint else TeacherIdentity()
        hub_name = None
        if pretrained and not checkpoint:
            hub_name = pretrained if isinstance(pretrained, str) else _deit_weights(model_name)
        self.model = timm.create_model(hub_name or model_name, pretrained=bool(hub_name),
                                       num_classes=num_classes or 1000)
        if state is not None:
            self._load(state, checkpoint, identity)
        self.architecture = model_name
        self.weights_sha256 = state_sha256(state if state is not None else self.model.state_dict())
        self.model.requires_grad_(False)
        self.model.eval()
        cfg = self.model.pretrained_cfg
        # a file without its own normalisation gets ImageNet's; timm's pretrained config describes its hub weights
        # only (its default tag of e.g. vit_base_patch16_224 is mean/std 0.5, not what a foreign file was trained on)
        mean, mean_from = _first((mean, "teacher.mean"), (identity.mean, "the teacher file"),
                                 (cfg.get("mean") if hub_name else None, f"timm's pretrained config of {hub_name}"),
                                 (IMAGENET_DEFAULT_MEAN, "ImageNet's, the default for a file without its own"))
        std, std_from = _first((std, "teacher.std"), (identity.std, "the teacher file"),
                               (cfg.get("std") if hub_name else None, f"timm's pretrained config of {hub_name}"),
                               (IMAGENET_DEFAULT_STD, "ImageNet's, the default for a file without its own"))
        self.mean, self.std = tuple(mean), tuple(std)
        size, size_from = _first((image_size, "teacher.image_size"), (identity.image_size, "the teacher file"),
                                 (cfg["input_size"][-1] if hub_name else None, f"timm's pretrained config of {hub_name}"),
                                 (None, "the student's: the batch is not resized"))
        self.image_size = int(size) if size else None
        normalisation = f"mean {_rounded(self.mean)} ({mean_from}), std {_rounded(self.std)} ({std_from})"
        log.info("teacher %s: normalisation %s; resolution %s (%s)", model_name, normalisation,
                 self.image_size or "as the student's", size_from)
        self.interpolation = interpolation or identity.interpolation or "bicubic"
        self.class_names = list(identity.class_names) if identity.class_names else None
        self.class_order = class_order
        self.min_val_top1 = min_val_top1
        input_mean, input_std = tuple(input_mean), tuple(input_std)
        self.renormalise = (self.mean, self.std) != (input_mean, input_std)
        # (x * s_in + m_in - m) / s  ==  x * scale + shift
        scale = torch.tensor(input_std) / torch.tensor(self.std)
        shift = (torch.tensor(input_mean) - torch.tensor(self.mean)) / torch.tensor(self.std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("class_index", None, persistent=False)
        self.num_parameters = sum(p.numel() for p in self.model.parameters())  # the network's, before folding
        self.folded_batchnorms = fold_batchnorm(self.model) if lean else 0
        self.memory_format = torch.channels_last if lean else torch.contiguous_format
        self.precision = precision
        self.compiles = compile  # not `compile`: that is nn.Module.compile()
        self._prepared_for: torch.device | None = None
        self._resolved_precision = resolve_precision(precision, torch.device("cpu"))
        self._forward = self.model.__call__  # a function, not a second registered module (state-dict keys)
        super().train(False)

    def _load(self, state: dict[str, Tensor], checkpoint: str, identity: TeacherIdentity) -> None:
        head = f"{self.model.pretrained_cfg['classifier']}.weight"
        if head in state and state[head].shape[0] != self.num_classes:
            self.model.reset_classifier(state[head].shape[0])
        target = {k: v.shape for k, v in self.model.state_dict().items()}
        missing = [k for k in target if k not in state]
        unexpected = [k for k in state if k not in target]
        mismatched = [k for k in state if k in target and state[k].shape != target[k]]
        if missing or unexpected or mismatched:
            raise ConfigError(f"teacher.checkpoint={checkpoint} does not fit teacher.model_name="
                              f"{self.model.pretrained_cfg.get('architecture')}: {_few('missing', missing)}"
                              f"{_few('unexpected', unexpected)}{_few('other-shape', mismatched)}"
                              f"; {suggest_architecture(state, identity)}")
        self.model.load_state_dict(state)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    # ---- running lean -------------------------------------------------------------------------------
    def prepare(self, device: torch.device | str) -> None:
        """Place the teacher on ``device`` in its resolved precision and memory format, compiled if asked.
        Runs once per device (the first forward calls it; the LightningModule calls it at setup to fail early)."""
        device = torch.device(device)
        if self._prepared_for == device:
            return
        resolved = resolve_precision(self.precision, device)
        if resolved != "fp32" and device.type == "cpu" and not bf16_is_fast(device):
            log.info("teacher.precision=%s is emulated on this CPU (no AVX512-BF16/AMX) and slower than fp32: "
                     "teacher.precision=auto picks fp32 here", resolved)
        self.to(device)
        self.model.to(dtype=PRECISIONS[resolved], memory_format=self.memory_format)
        self._resolved_precision = resolved
        self._forward = torch.compile(self.model.__call__) if self.compiles else self.model.__call__
        self._prepared_for = device
        log.info("teacher %s on %s: %s, %s, %d BatchNorm folded%s", self.architecture, device.type, resolved,
                 self.memory_format, self.folded_batchnorms, ", compiled" if self.compiles else "")

    @property
    def num_features(self) -> int:
        """Width of the pooled features before the classifier (what ``forward(x, features=True)`` returns)."""
        return self.model.num_features

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """fp32 logits of the (resized, re-normalised) images, in the data's class order; ``features``: also the
        pooled features before the classifier (timm's ``forward_head(pre_logits=True)``, as timm's feature
        distillation reads them), as ``(logits, features)``."""
        self.prepare(x.device)
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            x = x.float()
            if self.image_size is not None and tuple(x.shape[-2:]) != (self.image_size, self.image_size):
                x = F.interpolate(x, size=(self.image_size, self.image_size), mode=self.interpolation,
                                  antialias=self.interpolation in ("bilinear", "bicubic"), align_corners=False
                                  if self.interpolation in ("bilinear", "bicubic") else None)
            if self.renormalise:
                x = x * self.scale + self.shift
            x = x.to(dtype=PRECISIONS[self._resolved_precision], memory_format=self.memory_format)
            if features:
                maps = self.model.forward_features(x)
                pooled, logits = self.model.forward_head(maps, pre_logits=True), self.model.forward_head(maps)
            else:
                logits = self._forward(x)
            if self.class_index is not None:
                logits = logits[:, self.class_index]
        # a normal (not inference-mode) fp32 tensor: the loss may save it for the student's backward
        if features:
            return logits.to(torch.float32, copy=True), pooled.to(torch.float32, copy=True)
        return logits.to(torch.float32, copy=True)

    # ---- identity ---------------------------------------------------------------------------------
    def match_classes(self, data_classes: Sequence[str] | None) -> None:
        """Check the teacher's class names against the data's (both in label order); reorder with
        ``class_order=match``. Nothing to check when either side does not know its names."""
        if not data_classes or not self.class_names:
            return
        teacher, data = [str(c) for c in self.class_names], [str(c) for c in data_classes]
        if teacher == data:
            return
        if set(teacher) != set(data):
            only_teacher = sorted(set(teacher) - set(data))[:3]
            only_data = sorted(set(data) - set(teacher))[:3]
            raise ConfigError(f"the teacher knows other classes than the data (teacher only: {only_teacher}, data "
                              f"only: {only_data}): use a teacher trained on these classes (teacher.checkpoint=...)")
        if self.class_order != "match":
            raise ConfigError(f"the teacher's classes are in another order than the data's (teacher {teacher[:3]}..., "
                              f"data {data[:3]}...): set teacher.class_order=match to reorder the teacher's outputs")
        position = {name: i for i, name in enumerate(teacher)}
        self.class_index = torch.tensor([position[name] for name in data], device=self.scale.device)

    def check_val_top1(self, top1: float) -> None:
        """Stop when the teacher does not recognise the validation images (threshold: ``min_val_top1``,
        default twice chance)."""
        threshold = self.min_val_top1 if self.min_val_top1 is not None else 2.0 / self.num_classes
        log.info("teacher top-1 on the sanity-check validation batches: %.4f (teacher.min_val_top1=%.4f)", top1,
                 threshold)
        if top1 < threshold:
            raise ConfigError(
                f"the teacher does not recognise these images: top-1 {top1:.3f} on the first validation batches, "
                f"below teacher.min_val_top1={threshold:.3f}; check its resolution (teacher.image_size="
                f"{self.image_size or 'student'}), normalisation (teacher.mean/std={list(self.mean)}/{list(self.std)}) "
                "and class order (teacher.class_order), or lower teacher.min_val_top1")

    def fingerprint(self) -> dict:
        """What determines the teacher's logits for a given input batch (keys the teacher-logit cache)."""
        return {"architecture": self.architecture, "weights_sha256": self.weights_sha256,
                "precision": self._resolved_precision, "image_size": self.image_size,
                "interpolation": self.interpolation, "mean": list(self.mean), "std": list(self.std),
                "class_order": None if self.class_index is None else self.class_index.tolist()}


def _first(*candidates: tuple[object, str]) -> tuple[object, str]:
    """The first set value and where it came from (the last candidate when none is set)."""
    return next(((value, source) for value, source in candidates if value is not None), candidates[-1])


def _rounded(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _deit_weights(model_name: str) -> str:
    """The DeiT paper's teacher weights for ``model_name`` where timm has them (``regnety_160.deit_in1k``)."""
    tagged = f"{model_name}.deit_in1k"
    return tagged if tagged in timm.list_pretrained(f"{model_name}.*") else model_name


def _few(kind: str, keys: Sequence[str], shown: int = 3) -> str:
    if not keys:
        return ""
    return f" {len(keys)} {kind} keys ({', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''})"
