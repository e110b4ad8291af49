"""The embedded data set: scikit-learn's bundled handwritten digits (1797 real 8x8 images, no download)."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision.transforms import v2

from deit_train.data.base import ImageDataModule
from deit_train.data.subset import balanced_subset
from deit_train.errors import ConfigError


class TensorImageDataset(Dataset):
    """uint8 images (N, 3, H, W) in memory with integer labels and a per-sample transform."""

    def __init__(self, images: Tensor, labels: Tensor, transform=None) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def digits_splits(val_fraction: float, test_fraction: float, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fixed stratified train/val/test split of the digits (same ``seed`` -> same split, any machine)."""
    data = load_digits()
    images, labels = data.images, data.target
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=seed)
    train_x, val_x, train_y, val_y = train_test_split(
        rest_x, rest_y, test_size=val_fraction / (1 - test_fraction), stratify=rest_y, random_state=seed)
    return {"train": (train_x, train_y), "val": (val_x, val_y), "test": (test_x, test_y)}


def _to_rgb_uint8(images: np.ndarray, size: int) -> Tensor:
    """8x8 intensities 0..16 -> (N, 3, size, size) uint8, resized once up front (bicubic)."""
    x = torch.from_numpy(images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0, 1)
    return (x * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


class DigitsDataModule(ImageDataModule):
    """Handwritten digits, 10 classes, resized to ``image_size``.

    Training augmentation is a small random affine jitter (no flips: digits are not mirror-symmetric).
    ``train_fraction`` keeps a class-balanced subset of the training split (drawn with ``split_seed``).
    """

    num_classes = 10

    def __init__(
        self,
        image_size: int = 32,
        num_classes: int = 10,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        train_fraction: float = 1.0,
        augment: bool = True,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, mean=mean, std=std,
                         seed=seed, train_fraction=train_fraction, split_seed=split_seed)
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.augment = augment
        if num_classes != 10:
            raise ConfigError(f"data.num_classes={num_classes}, but the digits have 10 classes: drop the override")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        normalise = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
        jitter = [v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))] if self.augment else []
        train_tf, eval_tf = v2.Compose(jitter + normalise), v2.Compose(normalise)
        splits = digits_splits(self.val_fraction, self.test_fraction, self.split_seed)
        keep = balanced_subset(splits["train"][1], self.train_fraction, self.split_seed)
        splits["train"] = (splits["train"][0][keep], splits["train"][1][keep])
        sets = {}
        for name, (x, y) in splits.items():
            sets[name] = TensorImageDataset(_to_rgb_uint8(x, self.image_size), torch.from_numpy(y),
                                            train_tf if name == "train" else eval_tf)
        self.train_set, self.val_set, self.test_set = sets["train"], sets["val"], sets["test"]
