"""DeiT's distillation objectives (Touvron et al., 2021, Sec. 4) as a method (:mod:`deit_train.losses.base`).

Notation as in the paper: ``z_s`` student class-head logits, ``z_d`` student distillation-head logits,
``z_t`` teacher logits, ``psi`` softmax, ``tau`` temperature, ``lambda`` (here ``alpha``) the weight of
the teacher term; ``L_y`` the label loss (``loss=ce``: cross-entropy, as the paper's).

    none : L = L_y(z_s, y)
    soft : L = (1 - alpha) L_y(z_s, y) + alpha tau^2 KL(psi(z_t / tau) || psi(z_d / tau))
    hard : L = (1 - alpha) L_y(z_s, y) + alpha CE(z_d, argmax z_t)          (paper: alpha = 1/2)

``y`` may be hard labels or soft (mixup / label-smoothed) targets; the teacher always sees the same
(augmented, mixed) images as the student, so only the class head ever sees ``y``.

A student without distillation token (``model.distilled=false``) learns the teacher term on its class head,
``z_d = z_s``: the paper's "usual distillation" rows of Table 3 (Hinton et al.'s soft, or hard labels).
Terms: ``labels`` = (1 - alpha) L_y, ``teacher`` = alpha x the teacher term.
"""
from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.losses.base import DistillationMethod, StudentOutputs, TeacherOutputs
from deit_train.models.deit import is_distilled


def soft_distillation(student_logits: Tensor, teacher_logits: Tensor, tau: float,
                      kl_reduction: Literal["batchmean", "mean"] = "batchmean") -> Tensor:
    """tau^2 KL(psi(z_t / tau) || psi(z_s / tau)), summed and divided by the batch (``batchmean``, the paper's
    per-sample mean) or by batch x classes (``mean``, the official losses.py)."""
    kl = F.kl_div(F.log_softmax(student_logits / tau, dim=-1), F.log_softmax(teacher_logits / tau, dim=-1),
                  reduction="sum", log_target=True)
    denom = student_logits.shape[0] if kl_reduction == "batchmean" else student_logits.numel()
    return kl * (tau * tau) / denom


class DeiTDistillation(DistillationMethod):
    """``distill=none|soft|hard|soft_paper`` (see the module docstring).

    Args:
        distill_type: ``none``, ``soft`` or ``hard``.
        alpha: weight of the teacher term; the class head gets ``1 - alpha``.
        tau: softmax temperature of the soft loss (ignored otherwise).
        kl_reduction: ``batchmean`` divides the KL sum by the batch size (the paper's per-sample mean);
            ``mean`` divides by batch x classes, as the official DeiT code does.
        label_loss: the ground-truth term (``loss=``).
    """

    names = ("none", "soft", "hard")

    def __init__(
        self,
        distill_type: str = "none",
        alpha: float = 0.5,
        tau: float = 1.0,
        kl_reduction: Literal["batchmean", "mean"] = "batchmean",
        label_loss: nn.Module | None = None,
    ) -> None:
        super().__init__(distill_type, label_loss)
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"distill.alpha must lie in [0, 1], got {alpha}")
        if tau <= 0:
            raise ConfigError(f"distill.tau must be positive, got {tau}")
        if kl_reduction not in ("batchmean", "mean"):
            raise ConfigError(f"distill.kl_reduction must be batchmean or mean, got {kl_reduction!r}")
        self.teacher_needs = frozenset() if distill_type == "none" else frozenset({"logits"})
        self.alpha = alpha
        self.tau = tau
        self.kl_reduction = kl_reduction

    def check(self, student: nn.Module, teacher: nn.Module | None) -> None:
        super().check(student, teacher)
        if self.distill_type == "none" and is_distilled(student):
            raise ConfigError("model.distilled=true but distill=none: the distillation head would learn nothing; "
                              "use distill=soft|hard with a teacher, or model.distilled=false (CLS head only)")

    def terms(self, student: StudentOutputs, target: Tensor, teacher: TeacherOutputs | None) -> dict[str, Tensor]:
        """``dist=None`` (no distillation token): the teacher term falls on the class head."""
        labels = self.label_loss(student.cls, target)
        if self.distill_type == "none":
            return {"labels": labels}
        teacher_logits = self.teacher_logits(teacher)
        dist = student.dist if student.dist is not None else student.cls
        if self.distill_type == "soft":
            teacher_term = soft_distillation(dist, teacher_logits, self.tau, self.kl_reduction)
        else:
            teacher_term = F.cross_entropy(dist, teacher_logits.argmax(dim=-1))
        return {"labels": (1.0 - self.alpha) * labels, "teacher": self.alpha * teacher_term}
