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
