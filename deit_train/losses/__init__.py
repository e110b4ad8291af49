"""Distillation methods (``distill=``) and the label losses they use (``loss=``); the interface is in ``base``."""
from deit_train.losses.base import DistillationMethod, StudentOutputs, TeacherOutputs
from deit_train.losses.deit import DeiTDistillation, soft_distillation
from deit_train.losses.labels import BinaryCrossEntropyLabels, CrossEntropyLabels

__all__ = ["BinaryCrossEntropyLabels", "CrossEntropyLabels", "DeiTDistillation", "DistillationMethod",
           "StudentOutputs", "TeacherOutputs", "soft_distillation"]
