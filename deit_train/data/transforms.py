"""Image transforms for ImageNet-style data, from timm's transform factory."""
from __future__ import annotations

from collections.abc import Sequence

from timm.data import create_transform


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.875,
                   interpolation: str = "bicubic"):
    """Resize to ``image_size / crop_pct`` (256 for 224), center crop, to tensor, normalise."""
    return create_transform(image_size, is_training=False, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), crop_pct=crop_pct)


def basic_train_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                          interpolation: str = "bicubic"):
    """Random resized crop + horizontal flip, no colour or RandAugment."""
    return create_transform(image_size, is_training=True, interpolation=interpolation, mean=tuple(mean),
                            std=tuple(std), no_aug=False, hflip=0.5, color_jitter=None, auto_augment=None,
                            re_prob=0.0)
