"""Repeated-augmentation sampler: per-epoch index multiset over ranks, disjoint rank shares, Lightning keeps it."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader, DistributedSampler

from deit_train.data import AugmentRecipe, FakeDataModule, RepeatedAugSampler
from deit_train.data.stream import SeededSampler


def shares(n: int, world: int, epoch: int, **kwargs) -> list[list[int]]:
    out = []
    for rank in range(world):
        sampler = RepeatedAugSampler(list(range(n)), num_replicas=world, rank=rank, **kwargs)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
        assert len(out[-1]) == len(sampler)
    return out


@pytest.mark.parametrize("n,world", [(12, 2), (10, 4), (7, 3), (30, 1)])
def test_full_epoch_shows_every_image_three_times_across_ranks(n, world):
    per_rank = shares(n, world, epoch=0, full_epoch=True)
    counts = Counter(i for share in per_rank for i in share)
    padding = world * len(per_rank[0]) - 3 * n  # evens out the ranks; at most world - 1 extra copies
    assert 0 <= padding < world and len({len(s) for s in per_rank}) == 1
    assert set(counts) == set(range(n)) and sum(counts.values()) == 3 * n + padding
    assert all(3 <= c <= 3 + padding for c in counts.values())
    assert sum(c - 3 for c in counts.values()) == padding


def test_rank_shares_are_disjoint_slices_of_one_repeated_list():
    n, world = 12, 2
    per_rank = shares(n, world, epoch=5, full_epoch=True)
    # dealing round-robin: interleaving the ranks rebuilds [a, a, a, b, b, b, ...] of a permutation
    merged = [per_rank[pos % world][pos // world] for pos in range(3 * n)]
    firsts = merged[::3]
    assert sorted(firsts) == list(range(n)) and merged == [i for i in firsts for _ in range(3)]
    # the copies of one image are spread over the ranks (each gets its own augmentation, on its own GPU)
    assert per_rank[0][0] == per_rank[1][0] == merged[0]


def test_epoch_seeds_the_order_and_ranks_agree():
    a, b, again = shares(12, 2, 0, full_epoch=True), shares(12, 2, 1, full_epoch=True), shares(12, 2, 0, full_epoch=True)
    assert a == again and a != b


def test_official_epoch_length_is_the_dataset_length():
    n, world = 600, 4
    per_rank = shares(n, world, epoch=0)
    assert [len(s) for s in per_rank] == [512 // 4] * 4  # len // 256 * 256 samples overall, as the DeiT RASampler
    counts = Counter(i for share in per_rank for i in share)
    assert sum(counts.values()) == 512 and max(counts.values()) == 3
    assert sum(1 for c in counts.values() if c == 3) >= 512 // 3 - 1  # images seen are seen three times


def test_recipe_uses_it_only_with_several_processes():
    dataset = list(range(20))
    recipe = AugmentRecipe(repeated_aug=3)
    assert recipe.sampler(dataset, num_replicas=1, rank=0) is None
    assert AugmentRecipe(repeated_aug=1).sampler(dataset, num_replicas=2, rank=0) is None
    sampler = recipe.sampler(dataset, num_replicas=2, rank=1)
    assert isinstance(sampler, RepeatedAugSampler) and sampler.rank == 1 and sampler.num_repeats == 3


def test_datamodule_loader_carries_it_and_lightning_keeps_it():
    dm = FakeDataModule(num_classes=4, num_train=40, num_val=8, source_size=(8, 8), image_size=8, batch_size=4,
                        num_workers=0, recipe=AugmentRecipe(repeated_aug=3, repeated_aug_full_epoch=True))
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2, global_rank=1)
    loader = dm.train_dataloader()
    # the deterministic stream's sampler walks the repeated-augmentation order of this rank
    assert isinstance(loader.sampler, SeededSampler) and loader.sampler.rank == 1
    assert isinstance(loader.sampler.order, RepeatedAugSampler) and loader.sampler.order.rank == 1
    loader.sampler.set_epoch(4)
    assert [index for index, _ in loader.sampler] == shares(40, 2, 4, full_epoch=True)[1]
    assert len(loader) == 3 * 40 // 2 // 4

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False)
    assert trainer._accelerator_connector.is_distributed and isinstance(loader.sampler, DistributedSampler)
    kept = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert kept.sampler is loader.sampler
    plain = DataLoader(list(range(40)), batch_size=4, shuffle=True)
    replaced = trainer._data_connector._prepare_dataloader(plain, shuffle=True, mode=RunningStage.TRAINING)
    assert type(replaced.sampler) is DistributedSampler  # what Lightning does to an ordinary loader


def test_rank_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="rank 2"):
        RepeatedAugSampler(list(range(4)), num_replicas=2, rank=2)
