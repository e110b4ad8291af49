"""Base of the decoded-image sources (folders, HF datasets, CIFAR, fake): transforms from the augmentation
recipe, eval preprocessing as DeiTImageProcessor, the repeated-augmentation sampler, the corrupt-file policy.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from torch.utils.data import Dataset, Sampler

from deit_train.data.base import ImageDataModule
from deit_train.data.images import SkipCorrupt
from deit_train.data.recipes import AugmentRecipe
from deit_train.data.transforms import eval_transform
from deit_train.errors import ConfigError

log = logging.getLogger(__name__)


class AugmentedDataModule(ImageDataModule):
    """Subclasses build ``train_set`` from :meth:`train_transform` and ``val_set``/``test_set`` from
    :meth:`eval_transform`, passing file-backed datasets through :meth:`tolerate_corrupt`. Their constructors take
    the source's own options and hand the rest (``**options``: the ones below) to this one.

    Args:
        recipe: the ``augment`` group's :class:`AugmentRecipe` (default: ``simple``, crop + flip).
        crop_pct: eval resize = ``image_size / crop_pct`` (256 for 224, 438 for 384), then a center crop.
        interpolation: resize interpolation of train and eval transforms.
        skip_corrupt: skip (and count) undecodable files instead of stopping at the first one.
        uint8_workers: workers return uint8 crops and the recorded draws; normalisation and random erasing run on
            the batch after the transfer (:mod:`deit_train.data.device_augment`), bit-identical to the CPU path.
            Needed by ``augment.device=true``.
        classes: class names in label order, when the source knows them.
        train_fraction, split_seed: a class-balanced subset of the training split (:class:`ImageDataModule`).
    """

    classes: list[str] | None = None
    reads_files = False  # whether the train split hands the transform image files (augment.device_decode)

    def __init__(
        self,
        recipe: AugmentRecipe | None = None,
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int | None = None,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        pin_memory: bool | None = None,
        skip_corrupt: bool = False,
        seed: int = 0,
        train_fraction: float = 1.0,
        split_seed: int = 0,
        uint8_workers: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, image_size=image_size, mean=mean,
                         std=std, pin_memory=pin_memory, seed=seed, train_fraction=train_fraction,
                         split_seed=split_seed)
        self.recipe = recipe or AugmentRecipe()
        self.crop_pct, self.interpolation = crop_pct, interpolation
        self.skip_corrupt = skip_corrupt
        self._tolerant: list[SkipCorrupt] = []
        if self.recipe.device and not uint8_workers:
            raise ConfigError("augment.device=true needs data.uint8_workers=true (the device finishes uint8 crops)")
        self.uint8_workers = uint8_workers
        if self.recipe.device_decode and not self.reads_files:
            raise ConfigError(f"augment.device_decode=true decodes image files on the device, but {type(self).__name__}"
                              " holds decoded images: use augment.device_decode=false")

    @property
    def encoded_train_images(self) -> bool:
        """Whether file sources hand the train transform undecoded images (:class:`EncodedImage`): the device path
        decodes a JPEG at a reduced scale where the crop allows."""
        return self.recipe.device

    def train_transform(self):
        if self.uint8_workers and self.recipe.augments:
            worker = self.recipe.worker_transform(self.image_size, self.mean, self.std, self.interpolation)
            self.device_finish = worker.finish(self.mean, self.std)
            return worker
        return self.recipe.train_transform(self.image_size, self.mean, self.std, self.interpolation, self.crop_pct)

    def eval_transform(self):
        return eval_transform(self.image_size, self.mean, self.std, self.crop_pct, self.interpolation)

    def tolerate_corrupt(self, dataset: Dataset) -> Dataset:
        """``dataset`` itself (the first corrupt file stops the run), or wrapped in :class:`SkipCorrupt`."""
        if not self.skip_corrupt:
            return dataset
        tolerant = SkipCorrupt(dataset)
        self._tolerant.append(tolerant)
        return tolerant

    @property
    def skipped_corrupt(self) -> int:
        """Corrupt samples met so far (all splits, all workers)."""
        return sum(t.skipped for t in self._tolerant)

    def train_order(self, num_replicas: int, rank: int) -> Sampler | None:
        return self.recipe.sampler(self.train_set, num_replicas, rank, seed=self.seed)

    def teardown(self, stage: str) -> None:
        if self._tolerant:
            log.warning("skipped %d corrupt image(s) (data.skip_corrupt=true)", self.skipped_corrupt)
