"""Random images of a fixed size (torchvision ``FakeData``): for throughput benchmarks and dry runs, no files."""
from __future__ import annotations

from collections.abc import Sequence

from torchvision.datasets import FakeData

from deit_train.data.augmented import AugmentedDataModule
from deit_train.data.recipes import AugmentRecipe


class FakeDataModule(AugmentedDataModule):
    """``num_train`` / ``num_val`` random RGB images of ``source_size`` pixels with random labels, the same
    image for the same index on every run; the recipe's transforms run on them as on real photos.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        num_train: int = 1024,
        num_val: int = 256,
        source_size: Sequence[int] = (256, 256),
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int | None = None,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        pin_memory: bool | None = None,
        recipe: AugmentRecipe | None = None,
        seed: int = 0,
        train_fraction: float = 1.0,
        split_seed: int = 0,
        uint8_workers: bool = True,
    ) -> None:
        super().__init__(recipe=recipe, image_size=image_size, batch_size=batch_size, num_workers=num_workers,
                         crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std, pin_memory=pin_memory,
                         seed=seed, train_fraction=train_fraction, split_seed=split_seed, uint8_workers=uint8_workers)
        self.num_classes = num_classes
        self.num_train, self.num_val = num_train, num_val
        self.source_shape = (3, *source_size)
        self.classes = [f"class_{i}" for i in range(num_classes)]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        # FakeData draws each label with its image: the subset draws them once more, untransformed
        plain = FakeData(self.num_train, self.source_shape, self.num_classes)
        self.train_set = self.train_subset(
            FakeData(self.num_train, self.source_shape, self.num_classes, self.train_transform()),
            lambda: [plain[i][1] for i in range(self.num_train)])
        # a different offset: validation images are not training images
        self.val_set = FakeData(self.num_val, self.source_shape, self.num_classes, self.eval_transform(),
                                random_offset=self.num_train)
        self.test_set = self.val_set
