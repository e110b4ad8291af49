"""A teacher ensemble (``teacher=ensemble``): several frozen teachers, one target.

Each member is a :class:`~deit_train.teacher.network.FrozenTeacher` built from its own ``teacher`` config, so each
keeps its identity: architecture and weights, normalisation, resolution, precision, class order. The ensemble's
logits are, per ``combine``:

- ``probs``: ``log(mean_i softmax(z_i))``, the log of the mean of the members' probabilities (a softmax of them is
  that mean; a temperature ``tau`` in the method then acts on these log-probabilities);
- ``logits``: ``mean_i z_i``, the mean of the members' logits.

The teacher-logit cache keys an ensemble by every member's fingerprint and the combination.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.teacher.network import FrozenTeacher

COMBINES = ("probs", "logits")


class TeacherEnsemble(nn.Module):
    """Frozen teachers whose outputs are combined (see the module docstring).

    Args:
        members: the teachers, by name (``teacher.members.<name>``, as Hydra composes them) or as a list.
        combine: ``probs`` (mean of probabilities) or ``logits`` (mean of logits).
        min_val_top1: the ensemble's top-1 on the sanity-check validation batches must reach this (null: twice
            chance).
    """

    def __init__(self, members: Mapping[str, FrozenTeacher] | Sequence[FrozenTeacher], combine: str = "probs",
                 min_val_top1: float | None = None) -> None:
        super().__init__()
        named = dict(members) if isinstance(members, Mapping) else {str(i): m for i, m in enumerate(members)}
        if len(named) < 2:
            raise ConfigError(f"teacher=ensemble has {len(named)} member(s): name at least two with "
                              "teacher@teacher.members.<k>=<teacher> (k = 0, 1, ...), or use teacher=<name> for one")
        if combine not in COMBINES:
            raise ConfigError(f"teacher.combine={combine!r}: use probs (mean of probabilities) or logits")
        counts = {name: m.num_classes for name, m in named.items()}
        if len(set(counts.values())) > 1:
            raise ConfigError(f"the ensemble's members predict different class counts ({', '.join(f'teacher.members.{n}: {c}' for n, c in counts.items())}): "
                              "every member must be trained on the data's classes")
        names = {name: m.class_names for name, m in named.items() if m.class_names}
        if len({tuple(sorted(map(str, c))) for c in names.values()}) > 1:
            raise ConfigError(f"the ensemble's members know different classes (teacher.members {', '.join(names)}): "
                              "every member must be trained on the data's classes")
        self.names = list(named)
        self.members = nn.ModuleList(named.values())
        self.combine = combine
        self.min_val_top1 = min_val_top1
        self.architecture = "+".join(m.architecture for m in self.members)
        self.num_parameters = sum(m.num_parameters for m in self.members)

    @property
    def num_classes(self) -> int:
        return self.members[0].num_classes

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)

    def prepare(self, device: torch.device | str) -> None:
        for member in self.members:
            member.prepare(device)

    def match_classes(self, data_classes: Sequence[str] | None) -> None:
        """Each member checks (or, with its ``class_order=match``, reorders to) the data's classes."""
        for member in self.members:
            member.match_classes(data_classes)

    def forward(self, x: Tensor, features: bool = False) -> Tensor:
        if features:
            raise ConfigError("an ensemble has no single pooled feature vector: distill=feature needs one teacher "
                              "(teacher=<name>)")
        logits = torch.stack([member(x) for member in self.members])
        if self.combine == "logits":
            return logits.mean(0)
        return torch.logsumexp(logits.log_softmax(-1), dim=0) - math.log(len(self.members))

    def check_val_top1(self, top1: float) -> None:
        threshold = self.min_val_top1 if self.min_val_top1 is not None else 2.0 / self.num_classes
        if top1 < threshold:
            raise ConfigError(f"the teacher ensemble does not recognise these images: top-1 {top1:.3f} on the first "
                              f"validation batches, below teacher.min_val_top1={threshold:.3f}; check each member "
                              "(teacher.members.<k>.image_size/mean/std/class_order) or lower teacher.min_val_top1")

    def fingerprint(self) -> dict:
        """What decides the ensemble's logits: the combination and every member's fingerprint, in order."""
        return {"ensemble": self.combine,
                "members": {name: m.fingerprint() for name, m in zip(self.names, self.members)}}
