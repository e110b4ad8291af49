"""What every data source shares: loaders, class count, and the normalisation the models see."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from deit_train.data.device_augment import DeviceFinish, DeviceImages, collate
from deit_train.data.stream import SeededDataset, SeededSampler, StoppingLoader, StreamLoader
from deit_train.data.subset import balanced_subset, check_fraction
from deit_train.data.workers import default_num_workers
from deit_train.errors import ConfigError, StoppedBatch


class ImageDataModule(L.LightningDataModule):
    """Base of the data sources. Subclasses set ``num_classes`` in ``__init__`` (models are built from it)
    and fill ``train_set`` / ``val_set`` / ``test_set`` in :meth:`setup`.

    ``num_workers`` null: the CPUs granted to this task (``SLURM_CPUS_PER_TASK`` or the affinity mask) divided by
    the ranks sharing them (:func:`deit_train.data.workers.default_num_workers`). ``pin_memory`` null: pinned
    when training on a CUDA device. Workers persist across epochs.
    ``batch_size`` is per device; the global batch is ``batch_size x world size x accumulation``. ``seed`` (the
    run's) seeds the training order and every sample's augmentation (:mod:`deit_train.data.stream`).
    ``train_fraction`` keeps a class-balanced subset of the training split, drawn with ``split_seed``
    (data-efficiency sweeps); validation and test stay whole.
    """

    num_classes: int
    device_finish: DeviceFinish | None = None  # set with a uint8 train transform

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | None = 0,
        image_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        pin_memory: bool | None = None,
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

    @property
    def workers(self) -> int:
        """Loader workers of this rank: ``num_workers``, or its share of the granted CPUs when that is null."""
        if self.num_workers is not None:
            return self.num_workers
        return default_num_workers(getattr(self.trainer, "num_devices", 1))  # no trainer: the teacher-only pass

    @property
    def pinned(self) -> bool:
        """``pin_memory``, or (null) whether this run trains on a CUDA device."""
        if self.pin_memory is not None:
            return bool(self.pin_memory)
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        return device is not None and device.type == "cuda"

    def loader_options(self) -> dict:
        """Workers, pinning, persistence and collation of every loader of this source."""
        workers = self.workers
        return dict(num_workers=workers, pin_memory=self.pinned, persistent_workers=workers > 0, collate_fn=collate)

    def _loader(self, dataset: Dataset, train: bool, sampler: Sampler | None = None) -> DataLoader:
        # the stream resumes mid-epoch; every loader ends on a corrupt file with a batch every rank decides on
        loader = StreamLoader if isinstance(sampler, SeededSampler) else StoppingLoader
        return loader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train,  # mixup needs even batches, and BN-free ViTs gain nothing from a ragged last step
            **self.loader_options(),
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
        order = self.train_order(num_replicas, rank)
        sampler = SeededSampler(self.train_set, num_replicas, rank, seed=self.seed, order=order)
        if len(sampler) < self.batch_size:  # the loader drops the incomplete last batch: an epoch of nothing
            subset = f" (data.train_fraction={self.train_fraction})" if self.train_fraction != 1.0 else ""
            kept = (f", of which repeated augmentation (augment.repeated_aug) keeps {len(sampler)} per process"
                    if order is not None else "")
            raise ConfigError(
                f"data.batch_size={self.batch_size} is more than the {len(sampler)} training images each of "
                f"{num_replicas} process(es) gets per epoch ({len(self.train_set)} images{subset}{kept}), so an "
                "epoch would train nothing: lower data.batch_size, train on fewer processes (trainer.devices) or "
                "on more data (data.train_fraction)")
        return self._loader(SeededDataset(self.train_set, self.seed), train=True, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self.train_loader(*self._world())

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """uint8 training batches (:class:`DeviceImages`) get the recipe's device stages, then the input dtype of the
        trainer's precision (Lightning converted the loader's batch before the transfer, when it held uint8 images
        and host-side draws: ``trainer.precision=bf16-true`` gets bf16, as from float workers); others pass
        through. A file the device cannot decode makes a :class:`StoppedBatch`: every rank decides on it before the
        step."""
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], DeviceImages):
            try:
                images = self.device_finish(batch[0])
            except ConfigError as error:
                return StoppedBatch(error)
            if self.trainer is not None:
                images = self.trainer.precision_plugin.convert_input(images)
            return [images, *batch[1:]]
        return batch

    def batch_to_device(self, batch, device: torch.device | str):
        """What Lightning does with a batch before a training step, for loops without a Trainer (the teacher-only
        pass, benchmarks): the move to ``device`` and the transfer hook after it; a stopped batch raises its line."""
        batch = self.on_after_batch_transfer(move_data_to_device(batch, torch.device(device)), 0)
        if isinstance(batch, StoppedBatch):
            raise batch.error
        return batch

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
