"""Repeated augmentation on one process: off by default, with a line that says what the official code does
instead; augment.repeated_aug_one_process=true does as the official main.py (RASampler on one process too)."""
from __future__ import annotations

import logging

from deit_train.data import AugmentRecipe, RepeatedAugSampler


def test_off_on_one_process_says_what_the_official_code_does(caplog):
    with caplog.at_level(logging.INFO, logger="deit_train.data.recipes"):
        assert AugmentRecipe(repeated_aug=3).sampler(list(range(600)), num_replicas=1, rank=0) is None
    assert [r.getMessage() for r in caplog.records] == [
        "augment.repeated_aug=3 is off on one process: the official DeiT main.py would still use it, putting the 3 "
        "copies of an image into one batch and showing about a third of the images per epoch; "
        "augment.repeated_aug_one_process=true does as it does"]


def test_official_behaviour_on_one_process():
    sampler = AugmentRecipe(repeated_aug=3, repeated_aug_one_process=True).sampler(list(range(600)), 1, 0, seed=5)
    assert isinstance(sampler, RepeatedAugSampler)
    order = list(sampler)
    assert len(order) == 512  # floor(600 / 256) x 256, the official epoch length
    assert order == [i for i in order[::3] for _ in range(3)][:512]  # neighbours: a, a, a, b, b, b, ...
    assert len(set(order)) == 171  # about a third of the images, three times each
