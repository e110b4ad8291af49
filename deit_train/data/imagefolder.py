"""ImageNet-layout folders: ``root/train/<class>/*`` and ``root/val/<class>/*``."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchvision.datasets import ImageFolder

from deit_train.data.base import ImageDataModule
from deit_train.data.transforms import basic_train_transform, eval_transform
from deit_train.errors import ConfigError


class ImageFolderDataModule(ImageDataModule):
    """Class order = sorted folder names; ``num_classes`` is counted from ``root/train``.

    ImageNet has no labelled test split, so ``test`` evaluates the ``val`` folder.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        num_classes: int | None = None,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        pin_memory: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, mean=mean,
                         std=std, pin_memory=pin_memory)
        if not root:
            raise ConfigError("data.root is not set: pass data.root=/path/to/imagenet (a folder with train/ and val/)")
        self.root = Path(root).expanduser()
        for split in ("train", "val"):
            if not (self.root / split).is_dir():
                raise ConfigError(f"data.root={self.root} has no {split}/ folder: expected root/train/<class>/ "
                                  "and root/val/<class>/ (ImageNet layout)")
        classes = sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir())
        if num_classes is not None and num_classes != len(classes):
            raise ConfigError(f"data.num_classes={num_classes} but {self.root / 'train'} has {len(classes)} class "
                              "folders: fix the folder or drop data.num_classes")
        self.classes = classes
        self.num_classes = len(classes)
        self.crop_pct, self.interpolation = crop_pct, interpolation

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set = ImageFolder(str(self.root / "train"),
                                     basic_train_transform(self.image_size, self.mean, self.std, self.interpolation))
        self.val_set = ImageFolder(str(self.root / "val"),
                                   eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation))
        if self.val_set.classes != self.classes:
            raise ConfigError(f"{self.root / 'val'} class folders differ from {self.root / 'train'}'s: "
                              "both splits need the same class folder names")
        self.test_set = self.val_set
