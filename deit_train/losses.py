"""Distillation objectives of DeiT (Touvron et al., 2021, Sec. 4).

Notation as in the paper: ``z_s`` student class-head logits, ``z_d`` student distillation-head logits,
``z_t`` teacher logits, ``psi`` softmax, ``tau`` temperature, ``lambda`` (here ``alpha``) the weight of
the teacher term.

    none : L = CE(z_s, y)
    soft : L = (1 - alpha) CE(z_s, y) + alpha tau^2 KL(psi(z_t / tau) || psi(z_d / tau))
    hard : L = (1 - alpha) CE(z_s, y) + alpha CE(z_d, argmax z_t)          (paper: alpha = 1/2)

``y`` may be hard labels or soft (mixup / label-smoothed) targets; the teacher always sees the same
(augmented, mixed) images as the student, so only the class head ever sees ``y``.

A student without distillation token (``model.distilled=false``) learns the teacher term on its class head,
``z_d = z_s``: the paper's "usual distillation" rows of Table 3 (Hinton et al.'s soft, or hard labels).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit_train.errors import ConfigError

DistillType = Literal["none", "soft", "hard"]


def _cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    if target.dtype.is_floating_point:  # soft targets (mixup/cutmix) already carry their smoothing
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)


class DistillationLoss(nn.Module):
    """Loss on the student's two heads given the teacher's logits (see module docstring).

    Args:
        distill_type: ``none``, ``soft`` or ``hard``.
        alpha: weight of the teacher term; the class head gets ``1 - alpha``.
        tau: softmax temperature of the soft loss (ignored otherwise).
        label_smoothing: applied to the ground-truth term when targets are class indices.
        kl_reduction: ``batchmean`` divides the KL sum by the batch size (the paper's per-sample mean);
            ``mean`` divides by batch x classes, as the official DeiT code does.
    """

    def __init__(
        self,
        distill_type: DistillType = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        label_smoothing: float = 0.0,
        kl_reduction: Literal["batchmean", "mean"] = "batchmean",
    ) -> None:
        super().__init__()
        if distill_type not in ("none", "soft", "hard"):
            raise ConfigError(f"distill.type must be none, soft or hard, got {distill_type!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill.alpha must lie in [0, 1], got {alpha}")
        if tau <= 0:
            raise ConfigError(f"distill.tau must be positive, got {tau}")
        if kl_reduction not in ("batchmean", "mean"):
            raise ConfigError(f"distill.kl_reduction must be batchmean or mean, got {kl_reduction!r}")
        self.distill_type = distill_type
        self.alpha = alpha
        self.tau = tau
        self.label_smoothing = label_smoothing
        self.kl_reduction = kl_reduction

    @property
    def uses_teacher(self) -> bool:
        return self.distill_type != "none"

    def forward(
        self,
        cls_logits: Tensor,
        target: Tensor,
        dist_logits: Tensor | None = None,
        teacher_logits: Tensor | None = None,
    ) -> Tensor:
        """``dist_logits=None`` (no distillation token): the teacher term falls on the class head."""
        base = _cross_entropy(cls_logits, target, self.label_smoothing)
        if self.distill_type == "none":
            return base
        if teacher_logits is None:
            raise ValueError(f"{self.distill_type} distillation needs the teacher logits")
        if dist_logits is None:
            dist_logits = cls_logits
        teacher_logits = teacher_logits.detach()
        if self.distill_type == "soft":
            t = self.tau
            kl = F.kl_div(
                F.log_softmax(dist_logits / t, dim=-1),
                F.log_softmax(teacher_logits / t, dim=-1),
                reduction="sum",
                log_target=True,
            )
            denom = dist_logits.shape[0] if self.kl_reduction == "batchmean" else dist_logits.numel()
            teacher_term = kl * (t * t) / denom
        else:
            teacher_term = F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
        return (1.0 - self.alpha) * base + self.alpha * teacher_term
