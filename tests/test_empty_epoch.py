"""A training split too small for the batch on each process (a subset, several processes, repeated augmentation)
stops with one line instead of training nothing and testing an untrained model with exit 0."""
from __future__ import annotations

import pytest
from hydra.utils import instantiate

from conftest import compose_config
from deit_train.data import AugmentRecipe, FakeDataModule
from deit_train.errors import ConfigError


def test_digits_subset_on_two_processes_is_refused(tmp_path):
    cfg = compose_config(["experiment=quickstart", "data.train_fraction=0.1"], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    size = len(datamodule.train_set)
    assert size // 2 < 64 <= size  # fits one process, not two
    assert len(datamodule.train_loader(1, 0)) == size // 64
    with pytest.raises(ConfigError) as error:
        datamodule.train_loader(2, 1)
    assert str(error.value) == (
        f"data.batch_size=64 is more than the {-(-size // 2)} training images each of 2 process(es) gets per epoch "
        f"({size} images (data.train_fraction=0.1)), so an epoch would train nothing: lower data.batch_size, train "
        "on fewer processes (trainer.devices) or on more data (data.train_fraction)")


def test_repeated_augmentation_share_too_small_is_refused():
    # 300 images: repeated augmentation keeps floor(300 / 256) x 256 / 8 = 32 per process, under a batch of 48
    datamodule = FakeDataModule(num_classes=4, num_train=300, num_val=8, source_size=(8, 8), image_size=8,
                                batch_size=48, num_workers=0, recipe=AugmentRecipe(repeated_aug=3))
    datamodule.setup("fit")
    with pytest.raises(ConfigError, match=r"^data\.batch_size=48 is more than the 32 training images each of 8 "
                                          r"process\(es\) gets per epoch \(300 images, of which repeated augmentation "
                                          r"\(augment\.repeated_aug\) keeps 32 per process\)"):
        datamodule.train_loader(8, 0)
    assert len(datamodule.train_loader(4, 0)) == 1  # 64 per process
