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
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from deit_train.errors import StoppedBatch, batches_until_stopped

# kinds of draws, so that a sample seed never equals a step, index or order seed
_SAMPLE, _STEP, _INDEX, _ORDER = 0, 1, 2, 3


def stream_seed(*keys: int) -> int:
    """A well-mixed 32-bit seed from non-negative integer keys (numpy's SeedSequence: stable across versions)."""
    return int(np.random.SeedSequence([int(k) % 2**64 for k in keys]).generate_state(1)[0])


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """Seed of the ``position``-th sample of ``rank``'s share of ``epoch``."""
    return stream_seed(_SAMPLE, seed, epoch, rank, position)


def index_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` read without a seeded sampler (the same in every epoch)."""
    return stream_seed(_INDEX, seed, index)


# numpy's SeedSequence hash (numpy/random/bit_generator.pyx), on uint32 arrays: one call seeds a whole epoch
_POOL_SIZE, _XSHIFT = 4, np.uint32(16)
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_MULT_L, _MIX_MULT_R = np.uint32(0xCA01F9DD), np.uint32(0x4973F715)


def _uint32_words(key: int) -> list[int]:
    """A non-negative integer as SeedSequence reads it: little-endian 32-bit words, at least one."""
    words = [key & 0xFFFFFFFF]
    while key > 0xFFFFFFFF:
        key >>= 32
        words.append(key & 0xFFFFFFFF)
    return words


def sample_seeds(seed: int, epoch: int, rank: int, positions: np.ndarray) -> np.ndarray:
    """:func:`sample_seed` of every position at once (uint32 array): the sampler computes an epoch's seeds in one
    vectorised call instead of one ``SeedSequence`` per sample (30-65 us each) in the training process."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() > 0xFFFFFFFF):
        raise ValueError("sample positions must lie in 0..2**32-1")
    prefix = [w for key in (_SAMPLE, seed, epoch, rank) for w in _uint32_words(int(key) % 2**64)]
    columns = [np.full(positions.shape, w, dtype=np.uint32) for w in prefix] + [positions.astype(np.uint32)]
    columns += [np.zeros(positions.shape, dtype=np.uint32)] * (_POOL_SIZE - len(columns))
    hash_const = _INIT_A

    def hashmix(value: np.ndarray) -> np.ndarray:
        nonlocal hash_const
        value = value ^ np.uint32(hash_const)
        hash_const = (hash_const * _MULT_A) & 0xFFFFFFFF
        value = value * np.uint32(hash_const)
        return value ^ (value >> _XSHIFT)

    def mix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        result = _MIX_MULT_L * x - _MIX_MULT_R * y
        return result ^ (result >> _XSHIFT)

    pool = [hashmix(columns[i]) for i in range(_POOL_SIZE)]
    for src in range(_POOL_SIZE):
        for dst in range(_POOL_SIZE):
            if src != dst:
                pool[dst] = mix(pool[dst], hashmix(pool[src]))
    for src in range(_POOL_SIZE, len(columns)):
        for dst in range(_POOL_SIZE):
            pool[dst] = mix(pool[dst], hashmix(columns[src]))
    state = (pool[0] ^ np.uint32(_INIT_B)) * np.uint32((_INIT_B * _MULT_B) & 0xFFFFFFFF)  # generate_state(1)
    return state ^ (state >> _XSHIFT)


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

    def _shuffled_share(self) -> list[int]:
        size = len(self.dataset)
        indices = epoch_permutation(size, self.seed, self.epoch) if self.shuffle else list(range(size))
        padding = self.total_size - size  # DistributedSampler's: repeat the head so that every rank gets as many
        indices += (indices * math.ceil(padding / max(size, 1)))[:padding]
        return indices[self.rank:self.total_size:self.num_replicas]

    def __iter__(self):
        start, self._resume_at = self.start_position(), None  # a resumed epoch continues at its position
        indices = list(self.order) if self.order is not None else self._shuffled_share()
        seeds = sample_seeds(self.seed, self.epoch, self.rank, np.arange(start, len(indices)))  # a sample keeps its position's seed
        yield from zip(map(int, indices[start:]), seeds.tolist())

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else super().__len__()


class StoppingLoader(DataLoader):
    """A loader whose batch that cannot be made (a corrupt file, in a worker or here) ends the pass with a
    :class:`~deit_train.errors.StoppedBatch` carrying the line: every rank decides on it before the step
    (:mod:`deit_train.stops`), where the error alone would end this rank and leave the others waiting."""

    def __iter__(self):
        return batches_until_stopped(super().__iter__())


class StreamLoader(StoppingLoader):
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
            self._taken += not isinstance(batch, StoppedBatch)
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
