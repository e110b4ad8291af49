"""Hinton et al.'s knowledge distillation on the class head (``distill=kd``), and its hard-label form
(``distill=kd_hard``): the paper's "usual distillation" rows of Table 3, a student without distillation token.

    kd      : L = (1 - alpha) L_y(z_s, y) + alpha tau^2 KL(psi(z_t / tau) || psi(z_s / tau))
    kd_hard : L = (1 - alpha) L_y(z_s, y) + alpha CE(z_s, argmax z_t)

The DeiT soft/hard terms (:mod:`deit_train.losses.deit`) on the class head instead of the distillation token's:
same options (``alpha``, ``tau``, ``kl_reduction``), same numbers as DeiT's loss with ``z_d = z_s``.
"""
from __future__ import annotations

from torch import Tensor

from deit_train.losses.base import StudentOutputs
from deit_train.losses.deit import DeiTDistillation


class ClassHeadDistillation(DeiTDistillation):
    """``distill=kd|kd_hard`` (see the module docstring); arguments as :class:`DeiTDistillation`'s."""

    names = ("kd", "kd_hard")
    on_token = False

    @property
    def target_kind(self) -> str:
        return {"kd": "soft", "kd_hard": "hard"}[self.distill_type]

    def teacher_head(self, student: StudentOutputs) -> Tensor:
        return student.cls
