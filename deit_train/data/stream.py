"""The deterministic training stream: every random decision is a function of (seed, epoch, sample position or
step, rank) and of nothing else -- not of the model's initialisation, the number of loader workers, or what ran
before in the process.

- :class:`SeededSampler` gives each sample of this rank's epoch order its own seed;
  :class:`SeededDataset` seeds ``random``, numpy and torch with it before the sample's transform runs (timm and
  torchvision transforms draw from these global generators), in whichever worker process loads it.
- :class:`StepSeeding` reseeds the global generators before every training batch, from (seed, epoch, batch,
  rank): Mixup/CutMix (numpy), drop-path and SimMIM masks (torch) differ per rank (the official ``seed + rank``)
  and restart identically after a resume.

Two runs that differ only in the student therefore see bit-identical training batches, a resumed run continues
the uninterrupted run's stream, and a teacher-logit cache can be keyed by (epoch, rank, batch).
"""
from __future__ import annotations

import math
import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import Dataset, DistributedSampler, Sampler

# kinds of draws, so that a sample seed never equals a step or an order seed
_SAMPLE, _STEP, _ORDER = 0, 1, 2


def stream_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from non-negative integer keys (numpy's SeedSequence: stable across versions)."""
    return int(np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """Seed of the ``position``-th sample of ``rank``'s share of ``epoch``."""
    return stream_seed(_SAMPLE, seed, epoch, rank, position)


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """Seed of the main-process draws (Mixup/CutMix, drop-path, masks) of one training batch of ``rank``."""
    return stream_seed(_STEP, seed, epoch, batch_idx, rank)


def epoch_permutation(size: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``size`` items in ``epoch`` of a run seeded ``seed``. Its generator is seeded by a hash
    of (seed, epoch): with ``seed + epoch`` (torch's DistributedSampler; timm's RepeatAugSampler even ignores the
    seed) seed 1's epoch 0 would be seed 0's epoch 1, and the runs of a seed sweep would share their orders."""
    generator = torch.Generator().manual_seed(stream_seed(_ORDER, seed, epoch))
    return torch.randperm(size, generator=generator).tolist()


def seed_globals(seed: int, cpu_only: bool = False) -> None:
    """Seed python ``random``, numpy and torch's default generator(s); ``cpu_only`` leaves CUDA's untouched."""
    random.seed(seed)
    np.random.seed(seed)
    if cpu_only:
        torch.random.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


class SeededSampler(DistributedSampler):
    """This rank's epoch order, each index paired with its sample seed: yields ``(index, seed)``.

    The order is ``order``'s (e.g. the repeated-augmentation sampler) or, without one, :func:`epoch_permutation`
    dealt to the ranks as DistributedSampler deals its own (padded to an equal share per rank; one rank = a plain
    shuffle).
    A ``DistributedSampler``, so that Lightning keeps it under DDP instead of inserting its own; Lightning calls
    :meth:`set_epoch` before every epoch, also when resuming.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 order: Sampler | None = None, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.order = order

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.order is not None and hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)

    def _shuffled_share(self) -> list[int]:
        size = len(self.dataset)
        indices = epoch_permutation(size, self.seed, self.epoch) if self.shuffle else list(range(size))
        padding = self.total_size - size  # DistributedSampler's: repeat the head so that every rank gets as many
        indices += (indices * math.ceil(padding / max(size, 1)))[:padding]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        indices = iter(self.order) if self.order is not None else self._shuffled_share()
        for position, index in enumerate(indices):
            yield int(index), sample_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else super().__len__()


class SeededDataset(Dataset):
    """Reads ``dataset[index]`` for keys ``(index, seed)`` after seeding the global generators with ``seed``, so
    a sample's augmentation depends on its seed alone (not on the worker, nor on the samples before it)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        seed_globals(seed, cpu_only=True)  # workers never touch CUDA; the main process keeps its CUDA stream
        return self.dataset[index]


class StepSeeding(Callback):
    """Reseeds the global generators before every training batch with :func:`step_seed`."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        seed_globals(step_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))
