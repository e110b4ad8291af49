"""A teacher file without its own normalisation is read with ImageNet's, whatever timm's default hub tag of the
architecture uses (0.5 for vit_base_patch16_224); the init line says which normalisation and resolution, and why."""
from __future__ import annotations

import logging

import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from deit_train.teacher.identity import IDENTITY_KEY
from deit_train.teacher.network import FrozenTeacher


@pytest.fixture(scope="module")
def vit_base_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vit") / "vit_base.pth"
    torch.save(timm.create_model("vit_base_patch16_224", num_classes=10).state_dict(), path)  # a plain state dict
    return path


def test_plain_file_of_a_non_regnet_takes_imagenet_normalisation(vit_base_file, caplog):
    assert timm.create_model("vit_base_patch16_224", pretrained=False).pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    with caplog.at_level(logging.INFO, logger="deit_train.teacher.network"):
        teacher = FrozenTeacher("vit_base_patch16_224", checkpoint=str(vit_base_file))
    assert teacher.mean == IMAGENET_DEFAULT_MEAN and teacher.std == IMAGENET_DEFAULT_STD
    assert not teacher.renormalise  # the student's ImageNet-normalised images go in as they are
    assert teacher.image_size is None
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher vit_base_patch16_224:")]
    assert line == ("teacher vit_base_patch16_224: normalisation mean (0.485, 0.456, 0.406) (ImageNet's, the default "
                    "for a file without its own), std (0.229, 0.224, 0.225) (ImageNet's, the default for a file "
                    "without its own); resolution as the student's (the student's: the batch is not resized)")


def test_the_files_own_normalisation_and_options_win_and_are_named(vit_base_file, tmp_path, caplog):
    path = tmp_path / "with_identity.pth"
    torch.save({"state_dict": torch.load(vit_base_file),
                IDENTITY_KEY: {"architecture": "vit_base_patch16_224", "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                               "image_size": 224}}, path)
    with caplog.at_level(logging.INFO, logger="deit_train.teacher.network"):
        teacher = FrozenTeacher("vit_base_patch16_224", checkpoint=str(path), std=(0.25, 0.25, 0.25))
    assert teacher.mean == (0.5, 0.5, 0.5) and teacher.std == (0.25, 0.25, 0.25) and teacher.image_size == 224
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher vit_base_patch16_224:")]
    assert line == ("teacher vit_base_patch16_224: normalisation mean (0.5, 0.5, 0.5) (the teacher file), "
                    "std (0.25, 0.25, 0.25) (teacher.std); resolution 224 (the teacher file)")
