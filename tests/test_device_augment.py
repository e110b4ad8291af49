"""uint8 workers and RandAugment on the device (deit_train.data.device_augment).

- uint8 workers: batches BIT-IDENTICAL to the CPU path (normalisation in float32 is IEEE-exact; erasing's noise is
  regenerated from the worker's generator state by timm's own _get_pixels).
- device RandAugment: the same crops, flips, ops and magnitudes as the CPU path for 1,000 seeds; pixels BOUNDED:
  colour/LUT ops within 1 grey level of timm's PIL ops, geometric ops (bilinear tensor kernels against PIL bicubic)
  within a mean of 3 levels on photo-like crops (measured 1.2-2.6).
"""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F1
from PIL import Image
from timm.data.auto_augment import AugmentOp, rand_augment_transform
from timm.data.transforms import RandomResizedCropAndInterpolation

from conftest import compose_config
from deit_train.data.device_augment import DeviceImages, apply_op
from deit_train.data.fake import FakeDataModule
from deit_train.data.images import EncodedImage, load_rgb
from deit_train.data.recipes import AugmentRecipe, _posterize_keeping_zero_bits
from deit_train.data.stream import seed_globals
from deit_train.errors import ConfigError
from deit_train.teacher.cache import fingerprint_digest, run_fingerprint

DEIT = dict(name="deit", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, re_prob=0.25)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _batches(uint8: bool, workers: int = 0, **recipe):
    dm = FakeDataModule(num_classes=5, num_train=48, num_val=8, source_size=(40, 56), image_size=32, batch_size=16,
                        num_workers=workers, recipe=AugmentRecipe(**{**DEIT, **recipe}), uint8_workers=uint8)
    dm.setup("fit")
    return [dm.batch_to_device(batch, "cpu") for batch in dm.train_loader(2, 1)]


@pytest.mark.parametrize("erasing", [dict(re_prob=0.6), dict(re_prob=0.6, re_mode="rand", re_count=3),
                                     dict(re_prob=0.6, re_mode="const", re_count=2)])
def test_uint8_workers_give_the_cpu_paths_batches_bit_for_bit(erasing):
    cpu, uint8 = _batches(False, **erasing), _batches(True, **erasing)
    assert len(cpu) == len(uint8) == 1
    for (a, ya), (b, yb) in zip(cpu, uint8):
        assert b.dtype == torch.float32 and torch.equal(a, b) and torch.equal(ya, yb)


def test_uint8_workers_ship_uint8_and_draws_the_same_with_worker_processes():
    dm = FakeDataModule(num_classes=5, num_train=32, num_val=8, source_size=(40, 56), image_size=32, batch_size=16,
                        num_workers=2, recipe=AugmentRecipe(**DEIT))
    dm.setup("fit")
    raw = next(iter(dm.train_loader(1, 0)))
    assert isinstance(raw[0], DeviceImages) and raw[0].image.dtype == torch.uint8
    dm.num_workers = 0
    in_process = next(iter(dm.train_loader(1, 0)))
    assert torch.equal(dm.batch_to_device(raw, "cpu")[0], dm.batch_to_device(in_process, "cpu")[0])


def _recorded_cpu_path(monkeypatch) -> list:
    """Instrument today's CPU path: what its crop, flip and RandAugment ops were called with."""
    log: list = []
    get_params = RandomResizedCropAndInterpolation.get_params

    def crop_params(img, scale, ratio):
        params = get_params(img, scale, ratio)
        log.append(("crop", tuple(params)))
        return params

    monkeypatch.setattr(RandomResizedCropAndInterpolation, "get_params", staticmethod(crop_params))
    hflip = F1.hflip
    monkeypatch.setattr(F1, "hflip", lambda img: (log.append(("flip",)), hflip(img))[1])
    call = AugmentOp.__call__

    def op_call(self, img):
        original = self.aug_fn

        def recording(image, *args, **kwargs):
            log.append(("op", self.name, float(args[0]) if args else 0.0))
            return original(image, *args, **kwargs)

        self.aug_fn = recording
        try:
            return call(self, img)
        finally:
            self.aug_fn = original

    monkeypatch.setattr(AugmentOp, "__call__", op_call)
    return log


def test_device_path_draws_the_cpu_paths_crops_flips_ops_and_magnitudes_for_1000_seeds(monkeypatch):
    rng = np.random.default_rng(0)
    photos = []
    for k in range(8):  # sizes around the output and far above it (reduced-DCT decode on the device path)
        w, h = [(40, 30), (64, 48), (200, 150), (150, 260)][k % 4]
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
        photos.append(buffer.getvalue())
    recipe = AugmentRecipe(**DEIT, device=True)
    cpu = AugmentRecipe(**DEIT).train_transform(24, MEAN, STD)
    device = recipe.worker_transform(24, MEAN, STD)
    names = device.randaugment.names
    log = _recorded_cpu_path(monkeypatch)
    reduced = 0
    for seed in range(1000):
        photo = photos[seed % len(photos)]
        log.clear()
        seed_globals(seed, cpu_only=True)
        cpu(load_rgb(photo))
        cpu_draws = list(log)
        seed_globals(seed, cpu_only=True)
        params = device(EncodedImage(photo)).params
        recorded = [("crop", tuple(params["crop"].tolist()))] + [("flip",)] * bool(params["flip"])
        recorded += [("op", names[i], a) for i, a in zip(params["ra_ops"].tolist(), params["ra_args"].tolist())
                     if i >= 0]
        assert recorded == cpu_draws, seed
        reduced += int(params["reduction"]) > 1
    assert reduced > 100  # the header-first draws held while JPEGs decoded at reduced scales


def test_without_reduction_the_device_paths_worker_crop_is_the_cpu_paths():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8))
    crop_flip = AugmentRecipe(**DEIT).worker_transform(24, MEAN, STD).crop.transforms[:2]  # timm RRC + flip
    device = AugmentRecipe(**DEIT, device=True).worker_transform(24, MEAN, STD).crop
    for seed in range(50):
        seed_globals(seed, cpu_only=True)
        expected = image
        for step in crop_flip:
            expected = step(expected)
        seed_globals(seed, cpu_only=True)
        assert np.array_equal(np.asarray(device(image)[0]), np.asarray(expected))


def _photo(rng, size: int = 96) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack([127 + 100 * np.sin(xx / (9 + 7 * c) + yy / (13 + 5 * c) + phase[c]) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def test_device_kernels_stay_within_resampling_arithmetic_of_timms_pil_ops():
    rng = np.random.default_rng(2)
    fill = (124, 116, 104)
    ra = rand_augment_transform("rand-m9-mstd0.5-inc1", {"img_mean": fill, "interpolation": Image.BICUBIC})
    photos = [_photo(rng) for _ in range(6)]
    for op in ra.ops:
        for k, photo in enumerate(photos):
            random.seed(k)
            level = op.level_fn(min(10.0, max(0.0, random.gauss(9, 0.5))), op.hparams) if op.level_fn else ()
            pil_op = _posterize_keeping_zero_bits if op.name == "PosterizeIncreasing" else op.aug_fn
            expected = F1.pil_to_tensor(pil_op(photo, *level, **op.kwargs)).int()
            got = apply_op(op.name, F1.pil_to_tensor(photo), float(level[0]) if level else 0.0, fill).int()
            diff = (expected - got).abs().float()
            if op.name in GEOMETRIC:
                assert diff.mean() <= 3.0, (op.name, diff.mean())
            else:
                assert diff.max() <= 1, (op.name, diff.max())


@pytest.mark.parametrize("policy, named", [("rand-m9-mstd0.5-t3a", "Desaturate, GaussianBlur"),
                                           ("3a", "rand-"), ("augmix-m5", "rand-")])
def test_unsupported_device_recipes_stop_with_one_line(policy, named):
    with pytest.raises(ConfigError, match=named) as error:
        AugmentRecipe(name="x", auto_augment=policy, device=True)
    assert "\n" not in str(error.value) and "augment.device" in str(error.value)
    with pytest.raises(ConfigError, match="train_crop=rrc"):
        AugmentRecipe(name="x", train_crop="src", device=True)
    with pytest.raises(ConfigError, match="uint8_workers"):
        FakeDataModule(recipe=AugmentRecipe(**DEIT, device=True), uint8_workers=False)


def test_teacher_cache_keys_the_device_path_apart_and_keeps_the_cpu_paths_key(tmp_path):
    base = ["data=fake", "augment=deit", "teacher=regnetx_002_digits", "distill=soft"]
    teacher = torch.nn.Linear(2, 2)
    teacher.fingerprint = lambda: {"teacher": "t"}
    dm = FakeDataModule(num_classes=5, num_train=8)

    def fingerprint(*overrides):
        return run_fingerprint(compose_config([*base, *overrides], tmp_path), dm, teacher, 1, 5, "float16")

    cpu, uint8_off, device = fingerprint(), fingerprint("data.uint8_workers=false"), fingerprint("augment.device=true")
    assert "device" not in cpu["augment"] and "device_augment" not in cpu
    assert fingerprint_digest(cpu) == fingerprint_digest(uint8_off)  # the exact uint8 path is the same stream
    assert device["device_augment"]["device"] == "cpu"
    assert set(device["device_augment"]) == {"backend", "torch", "torchvision", "device"}
    assert fingerprint_digest(device) != fingerprint_digest(cpu)


def test_training_steps_see_the_cpu_paths_batches_and_the_device_path_trains(tmp_path, monkeypatch):
    from test_stream import FAKE, TINY_STUDENT, _digest
    from timm.data import Mixup

    from deit_train.train import train

    hashes: list = []
    original = Mixup.__call__
    monkeypatch.setattr(Mixup, "__call__", lambda self, x, y: (lambda out: (hashes.append(_digest(*out)), out)[1])(
        original(self, x, y)))

    def run(name: str, *overrides) -> list[str]:
        hashes.clear()
        train(compose_config([*FAKE, *TINY_STUDENT, "trainer.max_epochs=1", *overrides], tmp_path / name))
        return list(hashes)

    cpu = run("cpu", "data.uint8_workers=false")
    assert len(cpu) == 3
    assert run("uint8", "data.uint8_workers=true") == cpu
    device = run("device", "augment.device=true")
    assert len(device) == 3 and device != cpu
