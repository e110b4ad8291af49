"""Feature distillation as timm's ``FeatureDistillationTask`` (``timm/task/distillation.py``), ``distill=feature``.

The student's pooled features (timm's ``forward_head(pre_logits=True)``: the class token after the final norm; a
distilled student's class and distillation tokens averaged) go through a learned linear projector to the teacher's
width (none when the widths agree, as timm), and regress onto the teacher's pooled features:

    L = L_logit + weight x MSE(P f_s, f_t)          (regression=smooth_l1: torch's smooth L1 instead of MSE)

``L_logit`` is a logit method composed with it (``distill.logit``, default ``none``: the label loss alone, timm's
task loss): ``distill=feature distill@distill.logit=kd`` adds Hinton KD on the class head, ``distill@distill.logit=hard``
DeiT's hard distillation through the token (the student then has one). The projector is this method's trainable
part: trained with the student, saved and resumed in the checkpoint (``criterion.projector.*``), not exported.
The teacher's features are never cached: the teacher runs live (``teacher.cache_dir`` is refused).
Terms: the logit method's, and ``feature``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.losses.base import DistillationMethod, StudentOutputs, TeacherOutputs, method_reads_token
from deit_train.losses.deit import DeiTDistillation

REGRESSIONS = {"mse": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


class FeatureDistillation(DistillationMethod):
    """``distill=feature`` (see the module docstring).

    Args:
        logit: the logit method composed with the feature term (default: ``none``, the label loss alone).
        weight: weight of the feature term (timm's ``distill_loss_weight``).
        regression: ``mse`` (timm's) or ``smooth_l1``.
        student_dim, teacher_dim: the projector's input and output widths; null = read from the networks (a set
            value must match them).
    """

    names = ("feature",)

    def __init__(self, distill_type: str = "feature", logit: DistillationMethod | None = None, weight: float = 1.0,
                 regression: str = "mse", student_dim: int | None = None, teacher_dim: int | None = None) -> None:
        logit = logit if logit is not None else DeiTDistillation("none")
        super().__init__(distill_type, logit.label_loss)
        if "features" in logit.teacher_needs:
            raise ConfigError(f"distill.logit={logit.distill_type}: the composed method must be a logit method "
                              "(none, kd, kd_hard, dkd, soft, hard)")
        if regression not in REGRESSIONS:
            raise ConfigError(f"distill.regression={regression!r}: use {' or '.join(REGRESSIONS)}")
        if weight < 0:
            raise ConfigError(f"distill.weight must be >= 0, got {weight}")
        self.logit = logit
        self.weight, self.regression = weight, regression
        self.student_dim, self.teacher_dim = student_dim, teacher_dim
        self.teacher_needs = frozenset({"features"}) | logit.teacher_needs
        self.student_needs = frozenset({"features"}) | logit.student_needs
        self.projector: nn.Module | None = None

    @classmethod
    def reads_token(cls, config) -> bool:
        logit = config.get("logit")
        return logit is not None and method_reads_token(logit)

    def check(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self.logit.check(student, teacher)
        if teacher is not None and not hasattr(teacher, "num_features"):
            raise ConfigError(f"distill=feature regresses onto one teacher's pooled features, but teacher="
                              f"{type(teacher).__name__} has none (an ensemble's members each have their own): "
                              "use a single teacher=<name>")
        widths = (("student_dim", self.student_dim, student.num_features, "the student's"),
                  ("teacher_dim", self.teacher_dim, getattr(teacher, "num_features", None), "the teacher's"))
        for option, given, actual, whose in widths:
            if given is not None and actual is not None and given != actual:
                raise ConfigError(f"distill.{option}={given} but {whose} pooled features have {actual} channels: "
                                  f"set distill.{option}={actual} or null (read from the network)")

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """The projector from the student's width to the teacher's (none when they agree, as timm)."""
        self.logit.bind(student, teacher)
        width_in = self.student_dim or student.num_features
        width_out = self.teacher_dim or teacher.num_features
        self.projector = nn.Linear(width_in, width_out) if width_in != width_out else None

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.logit.set_epoch(epoch)

    def predict(self, student: StudentOutputs) -> Tensor:
        return self.logit.predict(student)

    def terms(self, student: StudentOutputs, target: Tensor, teacher: TeacherOutputs | None) -> dict[str, Tensor]:
        if student.features is None:
            raise ValueError("distill=feature needs the student's pooled features")
        projected = self.projector(student.features) if self.projector is not None else student.features
        dtype = torch.promote_types(projected.dtype, torch.float32)  # bf16 students regress in fp32, float64 stays
        feature = REGRESSIONS[self.regression](projected.to(dtype), self.teacher_features(teacher).to(dtype))
        return {**self.logit.terms(student, target, teacher), "feature": self.weight * feature}
