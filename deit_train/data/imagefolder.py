"""ImageNet-layout folders: ``root/train/<class>/*`` and ``root/val/<class>/*``."""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from deit_train.data.augmented import AugmentedDataModule
from deit_train.data.images import encoded_image, pil_loader
from deit_train.errors import ConfigError


def class_folders(split_dir: Path) -> list[str]:
    """Class names of an ImageNet-layout split: its sub-folder names, sorted (= label order)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir())


class ImageFolderDataModule(AugmentedDataModule):
    """Class order = sorted folder names; ``num_classes`` is counted from ``root/train``.

    Every image is decoded to RGB whatever its mode (:func:`deit_train.data.images.load_rgb`).
    ImageNet has no labelled test split, so ``test`` evaluates the ``val`` folder.
    """

    reads_files = True

    def __init__(
        self,
        root: str | None = None,
        num_classes: int | None = None,
        train_split: str = "train",
        val_split: str = "val",
        **options,
    ) -> None:
        super().__init__(**options)
        if not root:
            raise ConfigError("data.root is not set: pass data.root=/path/to/imagenet (a folder with train/ and val/)")
        self.root = Path(root).expanduser()
        self.train_split, self.val_split = train_split, val_split
        for split in (train_split, val_split):
            if not (self.root / split).is_dir():
                raise ConfigError(f"data.root={self.root} has no {split}/ folder: expected root/{train_split}/<class>/ "
                                  f"and root/{val_split}/<class>/ (ImageNet layout)")
        classes = class_folders(self.root / train_split)
        if not classes:
            raise ConfigError(f"{self.root / train_split} has no class folders: expected {train_split}/<class>/<image>")
        if num_classes is not None and num_classes != len(classes):
            raise ConfigError(f"data.num_classes={num_classes} but {self.root / train_split} has {len(classes)} class "
                              "folders: fix the folder or drop data.num_classes")
        self.classes = classes
        self.num_classes = len(classes)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = ImageFolder(str(self.root / self.train_split), self.train_transform(),
                            loader=encoded_image if self.encoded_train_images else pil_loader)
        val = ImageFolder(str(self.root / self.val_split), self.eval_transform(), loader=pil_loader)
        if val.classes != self.classes:
            raise ConfigError(f"{self.root / self.val_split} class folders differ from "
                              f"{self.root / self.train_split}'s: both splits need the same class folder names")
        self.train_set = self.tolerate_corrupt(self.train_subset(train, lambda: train.targets))
        self.val_set = self.tolerate_corrupt(val)
        self.test_set = self.val_set
