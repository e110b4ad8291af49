"""The evaluation transform for ImageNet-style data, from timm's transform factory (training transforms: the
augmentation recipes in :mod:`deit_train.data.recipes`)."""
from __future__ import annotations

from collections.abc import Sequence

from timm.data import create_transform


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875,
                   interpolation: str = "bicubic"):
    """Resize to ``image_size / crop_pct`` (256 for 224), center crop, to tensor, normalise."""
    return create_transform(image_size, is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=crop_pct)

