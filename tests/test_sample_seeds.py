"""An epoch's sample seeds in one vectorised call, equal to numpy's SeedSequence per sample."""
from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import Dataset

from deit_train.data.samplers import RepeatedAugSampler
from deit_train.data.stream import SeededSampler, sample_seed, sample_seeds


@pytest.mark.parametrize("seed, epoch, rank", [(0, 0, 0), (7, 3, 1), (2**32 + 5, 2**40, 7), (2**64 - 1, 12, 0)])
def test_vectorised_seeds_equal_seed_sequence(seed, epoch, rank):
    positions = np.concatenate([np.arange(300), [2**16, 2**31 + 3, 2**32 - 1]])
    expected = [int(np.random.SeedSequence([0, seed % 2**64, epoch % 2**64, rank, int(p)]).generate_state(1)[0])
                for p in positions]
    assert sample_seeds(seed, epoch, rank, positions).tolist() == expected
    assert [sample_seed(seed, epoch, rank, int(p)) for p in positions[:20]] == expected[:20]


class _Sized(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        return index


@pytest.mark.parametrize("order", [False, True])
def test_sampler_pairs_each_position_with_its_seed(order):
    data = _Sized(50)
    for epoch in (0, 4):
        sampler = SeededSampler(data, num_replicas=3, rank=2, seed=11,
                                order=RepeatedAugSampler(data, 3, 2, full_epoch=True) if order else None)
        sampler.set_epoch(epoch)
        pairs = list(sampler)
        assert len(pairs) == len(sampler)
        assert [s for _, s in pairs] == [sample_seed(11, epoch, 2, p) for p in range(len(pairs))]
        assert all(isinstance(i, int) and isinstance(s, int) for i, s in pairs)


def test_positions_outside_uint32_are_refused():
    with pytest.raises(ValueError):
        sample_seeds(0, 0, 0, np.array([2**32]))
