"""Repeated augmentation (Hoffer et al., 2020; DeiT Sec. 6): every sampled image appears ``num_repeats`` times
in an epoch, each copy on a different rank, so each copy gets its own random augmentation.
"""
from __future__ import annotations

import torch
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Dataset, DistributedSampler

from deit_train.data.stream import epoch_permutation


class RepeatedAugSampler(RepeatAugSampler, DistributedSampler):
    """timm's ``RepeatAugSampler`` (the official DeiT ``RASampler``), given rank and world size explicitly.

    The permutation of (seed, epoch) (:func:`epoch_permutation`; timm's is seeded by the epoch alone, the same
    for every seed) is repeated ``[a, a, a, b, b, b, ...]`` and dealt round-robin to the ranks,
    so the ranks' shares are disjoint positions of that list and the copies of one image land on different ranks.

    ``full_epoch=False`` is the official behaviour: each rank stops after ``len(dataset) / world`` samples
    (rounded down to a multiple of 256 images overall), so an epoch costs as many steps as without repetition
    and about a third of the images are seen, three times each. ``full_epoch=True`` walks the whole repeated
    list: every image exactly ``num_repeats`` times per epoch (up to the padding that evens out the ranks).

    It is also a ``DistributedSampler`` so that Lightning keeps it instead of wrapping it in its own
    distributed sampler (which would split the rank's share again); Lightning calls :meth:`set_epoch`.
    """

    def __init__(
        self,
        dataset: Dataset,
        num_replicas: int = 1,
        rank: int = 0,
        num_repeats: int = 3,
        shuffle: bool = True,
        full_epoch: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if full_epoch:  # select the whole repeated share of this rank
            selected_round, selected_ratio = 0, num_replicas / num_repeats
        else:
            selected_round, selected_ratio = 256, 0
        RepeatAugSampler.__init__(self, dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle,
                                  num_repeats=num_repeats, selected_round=selected_round,
                                  selected_ratio=selected_ratio)
        if full_epoch:
            self.num_selected_samples = self.num_samples
        # DistributedSampler attributes that Lightning or user code may read
        self.seed, self.drop_last = seed, False

    def __iter__(self):
        size = len(self.dataset)
        order = torch.tensor(epoch_permutation(size, self.seed, self.epoch) if self.shuffle else range(size))
        repeated = torch.repeat_interleave(order, int(self.num_repeats)).tolist()  # [a, a, a, b, b, b, ...]
        # timm's dealing: round-robin over the ranks, wrapping around to pad, up to the selected samples
        share = range(self.rank, self.total_size, self.num_replicas)[:self.num_selected_samples]
        return iter([repeated[i % len(repeated)] for i in share])

    def __len__(self) -> int:
        return self.num_selected_samples

