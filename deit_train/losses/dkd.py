"""Decoupled knowledge distillation (Zhao et al., CVPR 2022), ``distill=dkd``, on the class head.

With ``p = psi(z / tau)`` over the classes, ``t`` the target class, ``b = (p_t, 1 - p_t)`` the binary
target / non-target split and ``p^`` the distribution over the non-target classes alone (the softmax of the other
classes' ``z / tau``):

    TCKD = tau^2 KL(b^T || b^S)          NCKD = tau^2 KL(p^T || p^S)        (summed, divided by the batch)
    L = L_y(z_s, y) + min((epoch + 1) / warmup, 1) (alpha TCKD + beta NCKD)

as the official ``mdistiller/distillers/DKD.py`` (``dkd_loss`` and its linear warm-up ``min(epoch / warmup, 1)``,
epochs counted from 1 there; ``set_epoch`` receives them from 0). Defaults are the official config's:
alpha 1, beta 8, tau 4, warm-up 20 epochs, CE weight 1. The label term is this framework's ``loss=`` (cross-entropy
with its label smoothing; the official code's plain CE is ``loss.label_smoothing=0``). With Mixup/CutMix targets
the target class is the soft target's argmax (the official code trains without them).

NCKD needs the teacher's logits of every non-target class: from the teacher-logit cache only when it keeps them
all (``teacher.cache_topk`` = classes).
Terms: ``labels``, ``tckd`` and ``nckd`` (each weighted, warm-up included).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.losses.base import DistillationMethod, StudentOutputs, TeacherOutputs


def decoupled_kl(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD), each tau^2 x the KL summed over the batch / batch size, computed in log space."""
    zs, zt = student_logits / tau, teacher_logits / tau
    is_target = torch.zeros_like(zs, dtype=torch.bool).scatter_(1, target[:, None], True)
    log_ps, log_pt = zs.log_softmax(-1), zt.log_softmax(-1)
    # log of the binary split (p_t, 1 - p_t): 1 - p_t = sum of the other classes' p, as a logsumexp
    log_bs = torch.stack([log_ps.gather(1, target[:, None])[:, 0],
                          log_ps.masked_fill(is_target, float("-inf")).logsumexp(-1)], dim=1)
    log_bt = torch.stack([log_pt.gather(1, target[:, None])[:, 0],
                          log_pt.masked_fill(is_target, float("-inf")).logsumexp(-1)], dim=1)
    tckd = (log_bt.exp() * (log_bt - log_bs)).sum()
    # the distributions over the non-target classes: the target's column dropped from the softmax
    log_qs = zs.masked_fill(is_target, float("-inf")).log_softmax(-1)
    log_qt = zt.masked_fill(is_target, float("-inf")).log_softmax(-1)
    nckd = torch.where(is_target, 0.0, log_qt.exp() * (log_qt - log_qs)).sum()
    scale = tau * tau / student_logits.shape[0]
    return tckd * scale, nckd * scale


class DecoupledDistillation(DistillationMethod):
    """``distill=dkd`` (see the module docstring).

    Args:
        alpha: weight of TCKD (the paper's alpha).
        beta: weight of NCKD (the paper's beta).
        tau: softmax temperature.
        warmup_epochs: the distillation terms grow linearly over this many epochs (0: full weight at once).
        label_loss: the ground-truth term (``loss=``).
    """

    names = ("dkd",)
    teacher_needs = frozenset({"all_logits"})

    def __init__(self, distill_type: str = "dkd", alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0,
                 warmup_epochs: float = 20.0, label_loss: nn.Module | None = None) -> None:
        super().__init__(distill_type, label_loss)
        for option, value in (("alpha", alpha), ("beta", beta), ("warmup_epochs", warmup_epochs)):
            if value < 0:
                raise ConfigError(f"distill.{option} must be >= 0, got {value}")
        if tau <= 0:
            raise ConfigError(f"distill.tau must be positive, got {tau}")
        self.alpha, self.beta, self.tau, self.warmup_epochs = alpha, beta, tau, warmup_epochs

    def warmup(self) -> float:
        """The official ``min(epoch / warmup, 1)`` with its epochs counted from 1."""
        return min((self.epoch + 1) / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def terms(self, student: StudentOutputs, target: Tensor, teacher: TeacherOutputs | None) -> dict[str, Tensor]:
        labels = self.label_loss(student.cls, target)
        classes = target.argmax(-1) if target.dtype.is_floating_point else target
        tckd, nckd = decoupled_kl(student.cls, self.teacher_logits(teacher), classes, self.tau)
        weight = self.warmup()
        return {"labels": labels, "tckd": weight * self.alpha * tckd, "nckd": weight * self.beta * nckd}
