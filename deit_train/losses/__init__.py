"""Distillation methods (``distill=``) and the label losses they use (``loss=``); the interface is in ``base``."""
from deit_train.losses.base import DistillationMethod, StudentOutputs, TeacherOutputs, method_reads_token
from deit_train.losses.deit import DeiTDistillation, soft_distillation
from deit_train.losses.dkd import DecoupledDistillation, decoupled_kl
from deit_train.losses.feature import FeatureDistillation
from deit_train.losses.kd import ClassHeadDistillation
from deit_train.losses.labels import CrossEntropyLabels

__all__ = ["ClassHeadDistillation", "CrossEntropyLabels", "DecoupledDistillation", "DeiTDistillation",
           "DistillationMethod", "FeatureDistillation", "StudentOutputs", "TeacherOutputs", "decoupled_kl",
           "method_reads_token", "soft_distillation"]
