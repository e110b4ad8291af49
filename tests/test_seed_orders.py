"""Every epoch order is a hashed function of (seed, epoch): no seed replays another seed's epochs (seed + epoch
would make seed 1's epoch 0 seed 0's epoch 1, and the seeds of a sweep would share almost all their orders)."""
from __future__ import annotations

from deit_train.data import AugmentRecipe, RepeatedAugSampler
from deit_train.data.stream import SeededSampler

SEEDS, EPOCHS = range(10), range(31)


def _orders(make_samplers) -> dict[tuple[int, ...], tuple[int, int]]:
    """order -> the first (seed, epoch) that produced it; asserts no order repeats."""
    seen: dict[tuple[int, ...], tuple[int, int]] = {}
    for seed in SEEDS:
        samplers = make_samplers(seed)
        for epoch in EPOCHS:
            order = []
            for sampler in samplers:  # every rank's share, in rank order
                sampler.set_epoch(epoch)
                order += [index for index, _ in sampler] if isinstance(sampler, SeededSampler) else list(sampler)
            key = tuple(order)
            assert key not in seen, f"(seed {seed}, epoch {epoch}) replays the order of {seen[key]}"
            seen[key] = (seed, epoch)
    return seen


def test_plain_shuffle_orders_are_distinct_over_seeds_and_epochs():
    dataset = list(range(40))
    assert len(_orders(lambda seed: [SeededSampler(dataset, 1, 0, seed=seed)])) == len(SEEDS) * len(EPOCHS)
    assert len(_orders(lambda seed: [SeededSampler(dataset, 2, rank, seed=seed) for rank in (0, 1)])) == 310


def test_repeated_augmentation_orders_are_distinct_over_seeds_and_epochs():
    dataset = list(range(40))
    recipe = AugmentRecipe(repeated_aug=3)
    orders = _orders(lambda seed: [recipe.sampler(dataset, 2, rank, seed=seed) for rank in (0, 1)])
    assert len(orders) == len(SEEDS) * len(EPOCHS)
    # and through the stream's sampler, which walks that order
    _orders(lambda seed: [SeededSampler(dataset, 2, rank, seed=seed, order=recipe.sampler(dataset, 2, rank, seed=seed))
                          for rank in (0, 1)])


def test_a_seed_keeps_its_order_and_ranks_share_one_repeated_list():
    dataset = list(range(12))
    first = [list(RepeatedAugSampler(dataset, 2, rank, seed=3, full_epoch=True)) for rank in (0, 1)]
    again = [list(RepeatedAugSampler(dataset, 2, rank, seed=3, full_epoch=True)) for rank in (0, 1)]
    assert first == again
    merged = [first[pos % 2][pos // 2] for pos in range(36)]
    assert sorted(merged[::3]) == list(range(12)) and merged == [i for i in merged[::3] for _ in range(3)]
