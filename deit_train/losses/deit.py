"""DeiT's distillation objectives (Touvron et al., 2021, Sec. 4) as a method (:mod:`deit_train.losses.base`).

Notation as in the paper: ``z_s`` student class-head logits, ``z_d`` student distillation-head logits,
``z_t`` teacher logits, ``psi`` softmax, ``tau`` temperature, ``lambda`` (here ``alpha``) the weight of
the teacher term; ``L_y`` the label loss (``loss=ce``: cross-entropy, as the paper's).

    none : L = L_y(z_s, y)
    soft : L = (1 - alpha) L_y(z_s, y) + alpha tau^2 KL(psi(z_t / tau) || psi(z_d / tau))
    hard : L = (1 - alpha) L_y(z_s, y) + alpha CE(z_d, argmax z_t)          (paper: alpha = 1/2)

``y`` may be hard labels or soft (mixup / label-smoothed) targets; the teacher always sees the same
(augmented, mixed) images as the student, so only the class head ever sees ``y``.

``soft`` and ``hard`` train the distillation token (the student is built with one: ``model.distilled`` follows
the method). The paper's "usual distillation" rows of Table 3, the same terms on the class head of a student
without token (``z_d = z_s``), are ``distill=kd`` (Hinton et al.'s soft) and ``distill=kd_hard``
(:mod:`deit_train.losses.kd`). Terms: ``labels`` = (1 - alpha) L_y, ``teacher`` = alpha x the teacher term.
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
        distill_type: ``none``, ``soft`` or ``hard`` (``soft_paper`` is ``soft`` with the official values).
        alpha: weight of the teacher term; the class head gets ``1 - alpha``.
        tau: softmax temperature of the soft loss (ignored otherwise).
        kl_reduction: ``batchmean`` divides the KL sum by the batch size (the paper's per-sample mean);
            ``mean`` divides by batch x classes, as the official DeiT code does.
        label_loss: the ground-truth term (``loss=``).
    """

    names = ("none", "soft", "hard")
    on_token = True  # the teacher term trains the distillation head (kd: the class head)

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
        self.student_needs = frozenset({"dist"}) if self.reads_token({"distill_type": distill_type}) else frozenset()
        self.alpha = alpha
        self.tau = tau
        self.kl_reduction = kl_reduction

    @classmethod
    def reads_token(cls, config) -> bool:
        return cls.on_token and config["distill_type"] != "none"

    @property
    def target_kind(self) -> str:
        """``soft`` or ``hard``: what the teacher term matches (``none``: no teacher term)."""
        return self.distill_type

    def check(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if "dist" in self.student_needs and not is_distilled(student):
            raise ConfigError(f"distill={self.distill_type} trains the distillation token but model.distilled=false: "
                              f"drop model.distilled=false (the student follows the method), or use distill="
                              f"{'kd' if self.distill_type == 'soft' else 'kd_hard'} for the same term on the class "
                              "head (the paper's usual distillation)")
        super().check(student, teacher)

    def teacher_head(self, student: StudentOutputs) -> Tensor:
        """The logits the teacher term trains: the distillation head's."""
        if student.dist is None:
            raise ValueError(f"distill={self.distill_type} needs the distillation head's logits")
        return student.dist

    def terms(self, student: StudentOutputs, target: Tensor, teacher: TeacherOutputs | None) -> dict[str, Tensor]:
        labels = self.label_loss(student.cls, target)
        if self.distill_type == "none":
            return {"labels": labels}
        teacher_logits = self.teacher_logits(teacher)
        head = self.teacher_head(student)
        if self.target_kind == "soft":
            teacher_term = soft_distillation(head, teacher_logits, self.tau, self.kl_reduction)
        else:
            teacher_term = F.cross_entropy(head, teacher_logits.argmax(dim=-1))
        return {"labels": (1.0 - self.alpha) * labels, "teacher": self.alpha * teacher_term}
