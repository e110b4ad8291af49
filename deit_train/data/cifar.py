"""CIFAR-10 / CIFAR-100 from the python pickles (the ``cifar-10-batches-py`` / ``cifar-100-python`` folders
that ``torchvision.datasets.CIFAR10(root, download=True)`` or the official tarball leave on disk).

As in the DeiT transfer experiments, the 32x32 images are upscaled to the model's resolution by the same
transforms as ImageNet (the train crop and the eval resize + center crop both interpolate bicubically).
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from deit_train.data.augmented import AugmentedDataModule
from deit_train.errors import ConfigError

# folder, train files, test files, meta file, label key, class-name key
_LAYOUTS = {
    10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta",
         "labels", "label_names"),
    100: ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="latin1")


class CifarArrays(Dataset):
    """uint8 images (N, 32, 32, 3) and labels in memory; items are (transform(PIL RGB), label)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])


def read_cifar(root: Path, num_classes: int, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images NHWC uint8, labels int64, class names) of one split."""
    folder, train_files, test_files, meta, label_key, names_key = _LAYOUTS[num_classes]
    base = root / folder
    files = [base / name for name in (train_files if train else test_files) + [meta]]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"data.root={root}: missing {', '.join(missing)}; put the python version of CIFAR-"
                          f"{num_classes} there (torchvision.datasets.CIFAR{num_classes}(root, download=True) does)")
    batches = [_unpickle(f) for f in files[:-1]]
    images = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return np.ascontiguousarray(images, dtype=np.uint8), labels, list(_unpickle(files[-1])[names_key])


class CifarDataModule(AugmentedDataModule):
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (``num_classes=100``); validation and test use the test split,
    which is how the transfer results of the paper are reported.
    """

    def __init__(
        self,
        root: str | None = None,
        num_classes: int = 10,
        **options,
    ) -> None:
        super().__init__(**options)
        if num_classes not in _LAYOUTS:
            raise ConfigError(f"data.num_classes={num_classes}: CIFAR has 10 or 100 classes (data=cifar10|cifar100)")
        if not root:
            raise ConfigError(f"data.root is not set: pass data.root=/path/containing/{_LAYOUTS[num_classes][0]}")
        self.root = Path(root).expanduser()
        if not (self.root / _LAYOUTS[num_classes][0]).is_dir():
            raise ConfigError(f"data.root={self.root} has no {_LAYOUTS[num_classes][0]}/ folder: put the python "
                              f"version of CIFAR-{num_classes} there (torchvision's CIFAR{num_classes}(root, "
                              "download=True) does)")
        self.num_classes = num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_x, train_y, self.classes = read_cifar(self.root, self.num_classes, train=True)
        test_x, test_y, _ = read_cifar(self.root, self.num_classes, train=False)
        self.train_set = self.train_subset(CifarArrays(train_x, train_y, self.train_transform()), lambda: train_y)
        self.val_set = self.test_set = CifarArrays(test_x, test_y, self.eval_transform())
