"""Random images of a fixed size (torchvision ``FakeData``): for throughput benchmarks and dry runs, no files."""
from __future__ import annotations

from collections.abc import Sequence

from torchvision.datasets import FakeData

from deit_train.data.augmented import AugmentedDataModule


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
        **options,
    ) -> None:
        super().__init__(**options)
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
