"""The interface every distillation method implements (``distill=<name>``, one file each in this package).

A method is a loss module that says what it needs and returns named terms:

- ``teacher_needs``: what it reads from the teacher: ``logits`` (what the teacher-logit cache's top-k keeps is
  enough: the argmax, or the renormalised top-k distribution), ``all_logits`` (every class's logit: the cache must
  hold them all, ``teacher.cache_topk`` = classes), ``features`` (the teacher's pooled features: never cached, the
  teacher runs live). Empty: no teacher at all (``distill=none``), and none is built or run.
- ``student_needs``: what it reads from the student besides the class head (``dist``: the distillation token's
  head, so the student must be built with ``model.distilled=true``; ``features``: the student's pooled features).
- ``terms(student, target, teacher)``: the weighted loss terms by name; the loss is their sum, and each is logged
  as ``train/loss_<name>`` beside ``train/loss``.
- ``predict(student)``: the student's prediction (DeiT: class and distillation heads averaged).
- ``check(student, teacher)``: refuses, with one line naming the options, a student or teacher it cannot use.
- ``bind(student, teacher)``: builds the trainable parts whose size depends on the networks (a projector).
  Trainable parts are registered submodules of the method: the LightningModule gives them to the optimiser, saves
  and resumes them with the student (``criterion.*`` keys of the checkpoint); exports keep only the student.
- ``set_epoch(epoch)``: the module calls it at every training epoch's start (0-based), for schedules inside a
  loss (DKD's warm-up).
- ``reads_token(config)``: whether the student needs the distillation token for this method's config; the
  model configs' ``distilled: ${distillation_token:${distill}}`` asks it, so the student follows the method.

The ground-truth term is the method's ``label_loss`` (``loss=ce|...``, :mod:`deit_train.losses.labels`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.losses.labels import CrossEntropyLabels
from deit_train.models.deit import average_heads, is_distilled


@dataclass
class StudentOutputs:
    """What the student computed for a batch: class-head logits, and what the method asked for."""

    cls: Tensor
    dist: Tensor | None = None  # distillation-head logits (a student with a distillation token)
    features: Tensor | None = None  # pooled features before the head(s), when the method needs them


@dataclass
class TeacherOutputs:
    """What the (frozen) teacher computed for the same images, in the data's class order."""

    logits: Tensor | None = None
    features: Tensor | None = None


class DistillationMethod(nn.Module):
    """Base class of the methods (see the module docstring). Subclasses set the two ``*_needs`` and ``terms``.

    Args:
        distill_type: the method's name (``distill.distill_type``: runs are grouped and cached by it).
        label_loss: the ground-truth term on the class head; default cross-entropy without smoothing.
    """

    names: tuple[str, ...] = ()  # the distill_type values a subclass implements
    teacher_needs: frozenset[str] = frozenset()
    student_needs: frozenset[str] = frozenset()

    def __init__(self, distill_type: str, label_loss: nn.Module | None = None) -> None:
        super().__init__()
        if distill_type not in self.names:
            raise ConfigError(f"distill.distill_type must be {' or '.join(self.names)} for "
                              f"{type(self).__name__}, got {distill_type!r}")
        self.distill_type = distill_type
        self.label_loss = label_loss if label_loss is not None else CrossEntropyLabels()
        self.epoch = 0

    @property
    def uses_teacher(self) -> bool:
        return bool(self.teacher_needs)

    @classmethod
    def reads_token(cls, config) -> bool:
        """Whether the method, configured by ``config`` (its ``distill`` group), trains a distillation token."""
        return "dist" in cls.student_needs

    def check(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Refuse a student that lacks what the method reads, or has a head it would not train (subclasses add
        their own checks)."""
        if "dist" in self.student_needs and not is_distilled(student):
            raise ConfigError(f"distill={self.distill_type} trains the distillation token's head but "
                              "model.distilled=false: set model.distilled=true or pick a class-head method "
                              "(distill=kd|kd_hard|dkd|feature)")
        if "dist" not in self.student_needs and is_distilled(student):
            raise ConfigError(f"model.distilled=true but distill={self.distill_type} does not train the distillation "
                              "head (it would learn nothing): use model.distilled=false, or a token method "
                              "(distill=soft|hard) with a teacher")

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Build the trainable parts sized by the networks (none here)."""

    def set_epoch(self, epoch: int) -> None:
        """The training epoch about to run (0-based)."""
        self.epoch = epoch

    def terms(self, student: StudentOutputs, target: Tensor, teacher: TeacherOutputs | None) -> dict[str, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must define terms()")

    def forward(self, student: StudentOutputs, target: Tensor, teacher: TeacherOutputs | None = None) -> Tensor:
        return sum(self.terms(student, target, teacher).values())

    def predict(self, student: StudentOutputs) -> Tensor:
        return average_heads(student.cls, student.dist)

    def teacher_logits(self, teacher: TeacherOutputs | None) -> Tensor:
        """The teacher's logits, detached; a clear error when the caller did not supply them."""
        if teacher is None or teacher.logits is None:
            raise ValueError(f"distill={self.distill_type} needs the teacher logits")
        return teacher.logits.detach()

    def teacher_features(self, teacher: TeacherOutputs | None) -> Tensor:
        """The teacher's pooled features, detached; a clear error when the caller did not supply them."""
        if teacher is None or teacher.features is None:
            raise ValueError(f"distill={self.distill_type} needs the teacher's pooled features")
        return teacher.features.detach()


def method_reads_token(config) -> bool:
    """Whether the method a ``distill`` config instantiates trains a distillation token (``model.distilled``
    follows it through the ``distillation_token`` resolver)."""
    from hydra.utils import get_class

    return bool(get_class(config["_target_"]).reads_token(config))
