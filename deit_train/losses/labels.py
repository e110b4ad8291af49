"""Ground-truth losses on the class head (``loss=<name>``): the part of every method that reads the labels."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit_train.errors import ConfigError


class CrossEntropyLabels(nn.Module):
    """Cross-entropy against class indices (with ``label_smoothing``) or soft targets (Mixup/CutMix, which already
    carry their smoothing: timm's ``SoftTargetCrossEntropy``, as the official DeiT ``main.py`` picks it)."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing must lie in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if target.dtype.is_floating_point:
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.label_smoothing)


class BinaryCrossEntropyLabels(nn.Module):
    """DeiT III's ``--bce-loss``: binary cross-entropy of each class's logit against a binarised target.

    The official ``engine.py`` binarises the (Mixup/CutMix) target with ``targets.gt(0.0)`` -- every class present
    in the mixed image is a positive -- and ``main.py`` applies ``torch.nn.BCEWithLogitsLoss()`` (mean over batch x
    classes). Class indices (no Mixup; the official code then fails on shapes) become their one-hot target, which is
    what ``gt(0.0)`` makes of a one-hot. Label smoothing cannot be combined: ``gt(0.0)`` turns a smoothed target
    into all ones (DeiT III trains with ``--smoothing 0.0``), so ``label_smoothing`` must be 0 and soft targets that
    carry smoothing (every class above 0) stop the run on its first batch.
    """

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if label_smoothing != 0.0:
            raise ConfigError(f"loss=bce with loss.label_smoothing={label_smoothing}: the official --bce-loss "
                              "binarises the targets (targets.gt(0.0)), which makes every class of a smoothed target "
                              "a positive; set loss.label_smoothing=0 (DeiT III's --smoothing 0.0)")
        self.label_smoothing = label_smoothing  # read by the augment recipe's Mixup (configs/augment/*.yaml)
        self._checked = False

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, self.binary_target(target, logits.shape[-1]).to(logits.dtype))

    def binary_target(self, target: Tensor, num_classes: int) -> Tensor:
        """1 for every class in the (mixed) image, 0 elsewhere, as a float tensor of shape (batch, classes)."""
        if not target.dtype.is_floating_point:
            return F.one_hot(target, num_classes).float()
        if not self._checked:  # once: a Mixup pair has at most two classes above 0, a smoothed target all of them
            self._checked = True
            if num_classes > 2 and bool((target > 0).all(dim=-1).any()):
                raise ConfigError("loss=bce: the Mixup/CutMix targets carry label smoothing (every class above 0), "
                                  "which targets.gt(0.0) turns into all ones: set augment.label_smoothing=0")
        return target.gt(0.0).float()
