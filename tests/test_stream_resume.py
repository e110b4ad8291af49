"""The training stream's loader resumes inside an epoch: what a mid-epoch checkpoint stores brings a new loader to
the next unseen batch, with the same samples and augmentation seeds (Slurm's requeue signal saves mid-epoch)."""
import pytest
import torch
from torch.utils.data import Dataset

from deit_train.data.stream import SeededDataset, SeededSampler, StreamLoader


class Items(Dataset):
    """Item i is (i, a draw of torch's generator): the draw shows which seed the sample was loaded with."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        return index, torch.rand(())


def _loader(num_workers: int, rank: int = 0) -> StreamLoader:
    sampler = SeededSampler(Items(), num_replicas=2, rank=rank, seed=7)
    return StreamLoader(SeededDataset(Items()), batch_size=4, sampler=sampler, drop_last=True,
                        num_workers=num_workers, persistent_workers=num_workers > 0)


def _epoch(loader: StreamLoader, epoch: int) -> list[tuple[list[int], list[float]]]:
    loader.sampler.set_epoch(epoch)
    return [(index.tolist(), draw.tolist()) for index, draw in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restarted_epoch_continues_at_the_next_batch(num_workers):
    uninterrupted = _loader(num_workers)
    epochs = [_epoch(uninterrupted, 0), _epoch(uninterrupted, 1)]
    assert len(epochs[1]) == 5 and epochs[0] != epochs[1]

    interrupted = _loader(num_workers)
    interrupted.sampler.set_epoch(1)
    taken = []
    for index, draw in interrupted:
        taken.append((index.tolist(), draw.tolist()))
        if len(taken) == 2:
            state = interrupted.state_dict()  # what a checkpoint after the second batch of epoch 1 holds
            break
    assert state == {"epoch": 1, "batches": 2} and taken == epochs[1][:2]

    resumed = _loader(num_workers)
    resumed.load_state_dict(state)
    assert _epoch(resumed, 1) == epochs[1][2:]  # the rest of the epoch, same samples, same seeds
    assert resumed.state_dict() == {"epoch": 1, "batches": 5}
    assert _epoch(resumed, 2) == _epoch(_loader(0), 2)  # the next epoch starts at its beginning


def test_a_position_of_another_epoch_does_not_skip():
    loader = _loader(0, rank=1)
    loader.load_state_dict({"epoch": 0, "batches": 5})  # an epoch-end checkpoint's state, the run is in epoch 1
    assert _epoch(loader, 1) == _epoch(_loader(0, rank=1), 1)
