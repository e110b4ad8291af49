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

import random
from itertools import islice

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

# kinds of draws, so that a sample seed never equals a step seed
_SAMPLE, _STEP, _INDEX = 0, 1, 2


def stream_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from non-negative integer keys (numpy's SeedSequence: stable across versions)."""
    return int(np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """Seed of the ``position``-th sample of ``rank``'s share of ``epoch``."""
    return stream_seed(_SAMPLE, seed, epoch, rank, position)


def index_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` read without a seeded sampler (the same in every epoch)."""
    return stream_seed(_INDEX, seed, index)


def step_seed(seed: int, epoch: int, batch_idx: int, rank: int) -> int:
    """Seed of the main-process draws (Mixup/CutMix, drop-path, masks) of one training batch of ``rank``."""
    return stream_seed(_STEP, seed, epoch, batch_idx, rank)


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

    The order is ``order``'s (e.g. the repeated-augmentation sampler) or, without one, DistributedSampler's
    permutation seeded by ``seed + epoch`` (padded to an equal share per rank; one rank = a plain shuffle).
    A ``DistributedSampler``, so that Lightning keeps it under DDP instead of inserting its own; Lightning calls
    :meth:`set_epoch` before every epoch, also when resuming.
    """

    def __init__(self, dataset: Dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 order: Sampler | None = None, shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self.order = order
        self._resume_at: tuple[int, int] | None = None

    def resume(self, epoch: int, position: int) -> None:
        """Make the next pass over ``epoch`` start at ``position`` of this rank's order (a mid-epoch restart)."""
        self._resume_at = (epoch, position)

    def start_position(self) -> int:
        """Where the next pass starts: 0, or the position :meth:`resume` set for the current epoch."""
        epoch, position = self._resume_at or (self.epoch, 0)
        return position if epoch == self.epoch else 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        if self.order is not None and hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)

    def __iter__(self):
        start, self._resume_at = self.start_position(), None
        indices = iter(self.order) if self.order is not None else super().__iter__()
        for position, index in islice(enumerate(indices), start, None):  # a sample keeps its position's seed
            yield int(index), sample_seed(self.seed, self.epoch, self.rank, position)

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else super().__len__()


class StreamLoader(DataLoader):
    """The training loader of the stream, resumable inside an epoch (Lightning's stateful-loader protocol).

    Lightning stores :meth:`state_dict` (the epoch, and how many of its batches training took) in every checkpoint
    and calls :meth:`load_state_dict` when it restarts inside that epoch (e.g. from a Slurm requeue's
    ``hpc_ckpt``): the epoch then continues at the first batch not yet trained on, with the same sample seeds,
    instead of starting the epoch's order over. A sampler other than :class:`SeededSampler` (Lightning's
    ``overfit_batches`` puts in its own) starts over.
    """

    _taken = 0  # batches of the current pass handed to training, counting those a resumed pass skipped

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self.sampler, "epoch", 0), "batches": self._taken}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if isinstance(self.sampler, SeededSampler):
            self.sampler.resume(state_dict["epoch"], state_dict["batches"] * self.batch_size)

    def __iter__(self):
        start = self.sampler.start_position() if isinstance(self.sampler, SeededSampler) else 0
        self._taken = start // self.batch_size  # drop_last: whole batches, so a position is a batch boundary
        for batch in super().__iter__():
            self._taken += 1
            yield batch


class SeededDataset(Dataset):
    """Reads ``dataset[index]`` for keys ``(index, seed)`` after seeding the global generators with ``seed``, so
    a sample's augmentation depends on its seed alone (not on the worker, nor on the samples before it).

    A plain ``index`` comes from a sampler Lightning put in place of :class:`SeededSampler` (``overfit_batches``
    uses a ``SequentialSampler``): its seed is :func:`index_seed` of ``seed``, so the overfitted batches are the
    same augmented images in every epoch."""

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int):
        index, seed = (key, index_seed(self.seed, key)) if isinstance(key, int) else key
        seed_globals(seed, cpu_only=True)  # workers never touch CUDA; the main process keeps its CUDA stream
        return self.dataset[index]


class StepSeeding(Callback):
    """Reseeds the global generators before every training batch with :func:`step_seed` (and gives a restarted
    epoch's loader its position)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A restart inside an epoch continues the epoch's order (StreamLoader). Lightning hands a loader its saved
        # position only when it builds the loader after restoring the checkpoint, but the lr schedule's
        # trainer.estimated_stepping_batches builds it before: hand it over now, before the first batch (once;
        # nothing when not restarting).
        trainer.fit_loop._load_combined_loader_states()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        seed_globals(step_seed(self.seed, trainer.current_epoch, batch_idx, trainer.global_rank))
