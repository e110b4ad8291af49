"""The frozen teacher: a timm classifier (RegNetY-160 in the paper) that never trains."""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.models.checkpoint import read_state_dict

log = logging.getLogger(__name__)


class FrozenTeacher(nn.Module):
    """A timm model in eval mode for the whole run, without gradients, outside the optimizer.

    ``trainer.fit`` calls ``.train()`` on the LightningModule; :meth:`train` refuses, so dropout stays off
    and BatchNorm running statistics never change.

    Args:
        model_name: timm architecture, e.g. ``regnety_160``.
        checkpoint: local weights (plain state dict, timm file, official DeiT teacher file with a ``model``
            key, or a checkpoint of this project). The class count is read from the file.
        pretrained: load timm hub weights instead (needs network access).
        num_classes: class count when neither checkpoint nor hub weights say it (default 1000).
        mean, std: the normalisation the teacher was trained with (default: its timm pretrained config).
        input_mean, input_std: the normalisation of the images it receives (the student's); when they
            differ from ``mean``/``std`` the input is re-normalised.
    """

    def __init__(
        self,
        model_name: str,
        checkpoint: str | None = None,
        pretrained: bool = False,
        num_classes: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        input_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        input_std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        if not checkpoint and not pretrained:
            raise ConfigError(
                "teacher has no weights: set teacher.checkpoint=/path/to/teacher.pth (or teacher.pretrained=true online)"
            )
        state = read_state_dict(checkpoint) if checkpoint else None
        self.model = timm.create_model(model_name, pretrained=pretrained and not checkpoint,
                                       num_classes=num_classes or 1000)
        if state is not None:
            self._load(state, checkpoint)
        self.model.requires_grad_(False)
        cfg = self.model.pretrained_cfg
        mean = tuple(mean if mean is not None else cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        std = tuple(std if std is not None else cfg.get("std", IMAGENET_DEFAULT_STD))
        input_mean, input_std = tuple(input_mean), tuple(input_std)
        self.renormalise = (mean, std) != (tuple(input_mean), tuple(input_std))
        # (x * s_in + m_in - m) / s  ==  x * scale + shift
        scale = torch.tensor(input_std) / torch.tensor(std)
        shift = (torch.tensor(input_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)
        super().train(False)

    def _load(self, state: dict[str, Tensor], checkpoint: str) -> None:
        head = f"{self.model.pretrained_cfg['classifier']}.weight"
        if head not in state:
            raise ConfigError(f"teacher.checkpoint={checkpoint} has no '{head}' for teacher.model_name="
                              f"{self.model.pretrained_cfg.get('architecture')}: is it a checkpoint of that model?")
        if state[head].shape[0] != self.num_classes:
            self.model.reset_classifier(state[head].shape[0])
        try:
            self.model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise ConfigError(f"teacher.checkpoint={checkpoint} does not fit teacher.model_name: {first}") from exc

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if self.renormalise:
            x = x * self.scale + self.shift
        return self.model(x)

    def fingerprint(self) -> dict:
        """What decides this teacher's outputs (the teacher-logit cache keys its entries by it)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return {"architecture": self.model.pretrained_cfg.get("architecture"), "weights_sha256": digest.hexdigest(),
                "precision": "fp32", "image_size": None,
                "input_scale": self.scale.flatten().tolist(), "input_shift": self.shift.flatten().tolist()}
