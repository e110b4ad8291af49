"""What every data source shares: loaders, class count, and the normalisation the models see."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from deit_train.data.stream import SeededDataset, SeededSampler, StreamLoader
from deit_train.data.subset import balanced_subset, check_fraction


class ImageDataModule(L.LightningDataModule):
    """Base of the data sources. Subclasses set ``num_classes`` in ``__init__`` (models are built from it)
    and fill ``train_set`` / ``val_set`` / ``test_set`` in :meth:`setup`.

    ``batch_size`` is per device; the global batch is ``batch_size x world size x accumulation``. ``seed`` (the
    run's) seeds the training order and every sample's augmentation (:mod:`deit_train.data.stream`).
    ``train_fraction`` keeps a class-balanced subset of the training split, drawn with ``split_seed``
    (data-efficiency sweeps); validation and test stay whole.
    """

    num_classes: int

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        image_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        pin_memory: bool = False,
        seed: int = 0,
        train_fraction: float = 1.0,
        split_seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed = seed
        self.train_fraction, self.split_seed = check_fraction(train_fraction), split_seed
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.pin_memory = pin_memory
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def train_subset(self, dataset: Dataset, labels: Callable[[], Sequence[int]]) -> Dataset:
        """``dataset`` itself, or its class-balanced ``train_fraction``. ``labels()`` gives one label per item, in
        order; it is called only for a subset (a label column or FakeData's draws cost a pass over the data)."""
        if self.train_fraction == 1.0:
            return dataset
        return Subset(dataset, balanced_subset(labels(), self.train_fraction, self.split_seed).tolist())

    def _loader(self, dataset: Dataset, train: bool, sampler: Sampler | None = None) -> DataLoader:
        loader = StreamLoader if isinstance(sampler, SeededSampler) else DataLoader  # the stream resumes mid-epoch
        return loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,  # mixup needs even batches, and BN-free ViTs gain nothing from a ragged last step
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer  # set by Lightning when fitting
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_order(self, num_replicas: int, rank: int) -> Sampler | None:
        """A sampler giving this rank's epoch order (e.g. repeated augmentation), or None: a seeded shuffle."""
        return None

    def train_loader(self, num_replicas: int, rank: int) -> DataLoader:
        """The training loader of ``rank`` out of ``num_replicas``: the deterministic stream of
        :mod:`deit_train.data.stream` (also used by the teacher-only pass, which walks every rank's share)."""
        sampler = SeededSampler(self.train_set, num_replicas, rank, seed=self.seed,
                                order=self.train_order(num_replicas, rank))
        return self._loader(SeededDataset(self.train_set, self.seed), train=True, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(*self._world())

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
