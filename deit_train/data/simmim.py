"""SimMIM pretraining data: any image source, its training images under the SimMIM transform."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch.callbacks import Callback
from torchvision.transforms import InterpolationMode, v2

from deit_train.errors import ConfigError


def simmim_transform(image_size: int, mean: Sequence[float], std: Sequence[float],
                     scale: Sequence[float] = (0.67, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                     hflip: float = 0.5, interpolation: str = "bilinear") -> v2.Compose:
    """SimMIM's pretraining augmentation: RandomResizedCrop (scale 0.67-1, ratio 3/4-4/3), horizontal flip,
    normalise. PIL images and uint8 tensors alike; masks are drawn per batch by the module."""
    flip = [v2.RandomHorizontalFlip(hflip)] if hflip > 0 else []
    return v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(image_size, scale=tuple(scale), ratio=tuple(ratio),
                             interpolation=InterpolationMode(interpolation), antialias=True),
        *flip,
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


class SimMIMTrainTransform(Callback):
    """Puts :func:`simmim_transform` on the training set of the run's data module (any image source: digits,
    imagefolder, ...) once the data module is set up; validation and test keep its eval transform.
    Labels still come with the images; SimMIM ignores them.

    Args:
        scale, ratio, hflip, interpolation: RandomResizedCrop and flip settings (SimMIM: 0.67-1, 3/4-4/3,
            0.5, bilinear).
    """

    def __init__(self, scale: Sequence[float] = (0.67, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, interpolation: str = "bilinear") -> None:
        self.scale, self.ratio, self.hflip, self.interpolation = tuple(scale), tuple(ratio), hflip, interpolation

    def setup(self, trainer, pl_module, stage: str) -> None:
        datamodule = trainer.datamodule
        train_set = getattr(datamodule, "train_set", None)
        if train_set is None:  # e.g. a test-only run
            return
        if not hasattr(train_set, "transform"):
            raise ConfigError(f"data={type(datamodule).__name__} has no per-image transform on its training set for "
                              "callbacks.simmim_transform to replace: use an image data source (digits, imagefolder)")
        train_set.transform = simmim_transform(datamodule.image_size, datamodule.mean, datamodule.std, self.scale,
                                               self.ratio, self.hflip, self.interpolation)
