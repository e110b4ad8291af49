"""Augmentation recipes: transforms from timm, Mixup soft targets, the teacher seeing mixed images, configs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from timm.data import Mixup
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from torchvision import transforms as T

from conftest import FAST_DIGITS, compose_config, run_cli_in_process
from deit_train.data import AugmentRecipe, build_mixup
from deit_train.data.transforms import eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def recipe(name: str, tmp_path) -> AugmentRecipe:
    cfg = compose_config(["data=fake", f"augment={name}"], tmp_path)
    return instantiate(cfg.augment)


def ops(transform) -> list:
    return list(transform.transforms)


@pytest.mark.parametrize("name", ["deit", "three_augment", "simple", "none"])
def test_every_recipe_gives_normalised_tensors(name, tmp_path):
    tf = recipe(name, tmp_path).train_transform(24, MEAN, STD)
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    out = tf(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_deit_recipe_is_the_papers(tmp_path):
    r = recipe("deit", tmp_path)
    steps = ops(r.train_transform(32, MEAN, STD))
    kinds = [type(s).__name__ for s in steps]
    assert kinds[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]
    assert "ColorJitter" not in kinds  # off under RandAugment, as timm does
    rand = next(s for s in steps if isinstance(s, RandAugment))
    assert rand.num_layers == 2 and all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in rand.ops)
    erasing = steps[-1]
    assert isinstance(erasing, RandomErasing) and erasing.probability == 0.25 and erasing.mode == "pixel"
    assert steps[0].interpolation == T.InterpolationMode.BICUBIC
    mixup = r.mixup(10)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.switch_prob, mixup.label_smoothing) == (0.8, 1.0, 0.5, 0.1)
    assert r.repeated_aug == 3


def test_three_augment_recipe(tmp_path):
    r = recipe("three_augment", tmp_path)
    steps = ops(r.train_transform(32, MEAN, STD))
    assert isinstance(steps[0], T.Resize) and isinstance(steps[1], T.RandomCrop)
    assert steps[1].padding == 4 and steps[1].padding_mode == "reflect"
    assert isinstance(steps[2], T.RandomHorizontalFlip)
    three = next(s for s in steps if isinstance(s, AutoAugment))
    assert sorted(sub[0].name for sub in three.policy) == ["Desaturate", "GaussianBlurRand", "Solarize"]
    jitter = next(s for s in steps if isinstance(s, T.ColorJitter))
    assert jitter.brightness == (0.7, 1.3) and jitter.hue is None
    assert not any(isinstance(s, (RandAugment, RandomErasing)) for s in steps)
    # one of the three ops, each always applied: a coloured image comes out changed
    torch.manual_seed(0)
    image = Image.new("RGB", (32, 32), (250, 40, 40))
    plain = eval_transform(32, MEAN, STD, crop_pct=1.0)(image)
    assert not torch.allclose(r.train_transform(32, MEAN, STD)(image), plain)


def test_none_recipe_is_the_eval_transform_and_simple_has_no_mixup(tmp_path):
    image = Image.new("RGB", (50, 37), (10, 120, 240))
    image.putpixel((3, 4), (255, 255, 0))
    none = recipe("none", tmp_path)
    assert torch.equal(none.train_transform(32, MEAN, STD)(image), eval_transform(32, MEAN, STD)(image))
    assert none.mixup(10) is None and recipe("simple", tmp_path).mixup(10) is None
    assert build_mixup(None, 10) is None


def test_mixup_targets_are_soft_smoothed_and_sum_to_one():
    np.random.seed(0)  # timm's Mixup draws from numpy
    mixup = AugmentRecipe(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1).mixup(num_classes=10)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8)
    changed = 0
    for _ in range(10):  # both mixup and cutmix branches
        mixed, target = mixup(images.clone(), labels.clone())
        assert mixed.shape == images.shape and target.shape == (8, 10) and target.dtype == torch.float32
        torch.testing.assert_close(target.sum(dim=1), torch.ones(8))
        assert target.min() >= 0.1 / 10 - 1e-6 and target.max() <= 1 - 0.1 + 0.1 / 10 + 1e-6
        # the weight of the image's own label is the share of its own pixels (lam), the rest its partner's
        lam = (target[0, 0] - 0.01) / 0.9
        assert torch.allclose(target[7, 7], target[0, 0]) and torch.allclose(target[0, 7], 1 - 0.1 - lam * 0.9 + 0.01)
        changed += not torch.equal(mixed, images)
    assert changed >= 8  # a CutMix box can clip to nothing now and then


def test_eval_resize_follows_crop_pct():
    assert eval_transform(224, MEAN, STD).transforms[0].size == 256
    assert eval_transform(384, MEAN, STD).transforms[0].size == 438


def test_teacher_sees_the_mixed_images(tmp_path, digits_teacher_file):
    cfg = compose_config(["experiment=quickstart", "augment=deit", f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0",
                          *FAST_DIGITS], tmp_path)
    assert cfg.data.augment is True  # the digits keep their own jitter (no flips) under any real recipe
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.module)
    assert isinstance(module.mixup, Mixup) and module.mixup.num_classes == 10
    seen = {}
    module.teacher.register_forward_pre_hook(lambda m, args: seen.__setitem__("teacher", args[0].clone()))
    module.student.patch_embed.register_forward_pre_hook(lambda m, args: seen.__setitem__("student", args[0].clone()))
    datamodule.setup("fit")
    images, labels = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(1)
    loss = module.training_step((images.clone(), labels), 0)
    assert torch.isfinite(loss)
    assert torch.equal(seen["teacher"], seen["student"]) and not torch.equal(seen["student"], images)


def test_digits_recipes_keep_their_own_augmentation(tmp_path):
    for name, jitter in (("simple", True), ("none", False), ("deit", True)):
        cfg = compose_config(["experiment=quickstart", f"augment={name}"], tmp_path)
        assert cfg.data.augment is jitter
        assert (cfg.module.mixup.recipe.name, name) == (name, name)


def test_a_digits_run_with_the_deit_recipe(tmp_path, digits_teacher_file):
    proc = run_cli_in_process(["experiment=quickstart", "augment=deit", f"teacher.checkpoint={digits_teacher_file}",
                               "teacher.min_val_top1=0", "trainer.max_epochs=1", *FAST_DIGITS], tmp_path / "run",
                              tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["test/top1"] <= 1.0


def test_randaugment_strongest_posterize_works_under_current_pillow():
    steps = ops(AugmentRecipe(auto_augment="rand-m9-mstd0.5-inc1").train_transform(16, MEAN, STD))
    rand = next(s for s in steps if isinstance(s, RandAugment))
    posterize = next(op for op in rand.ops if op.name == "PosterizeIncreasing")
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0, 1.0  # -> keep 0 bits
    out = posterize(Image.new("RGB", (4, 4), (200, 100, 50)))
    assert out.getextrema() == ((0, 0), (0, 0), (0, 0))  # black, as Pillow < 13 made it (13 raises)
    posterize.magnitude = 5  # keep 2 bits: 200 -> 192, 100 -> 64, 50 -> 0
    assert posterize(Image.new("RGB", (1, 1), (200, 100, 50))).getpixel((0, 0)) == (192, 64, 0)
