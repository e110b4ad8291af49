"""Augmentation recipes (the ``augment`` config group): train transform, Mixup/CutMix and repeated augmentation.

Everything is timm's or torchvision's: ``create_transform`` (RandomResizedCrop, RandAugment, ColorJitter,
RandomErasing, the ``3a`` policy of DeiT III), ``timm.data.Mixup`` and timm's repeated-augmentation sampler.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from PIL import Image
from timm.data import Mixup, create_transform
from timm.data import auto_augment
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import Dataset, Sampler
from torchvision import transforms

from deit_train.data.device_augment import (DraftCropFlip, ErasingDraws, RecordedRandAugment, WorkerTransform,
                                            check_device_recipe, unsupported_ops)
from deit_train.data.samplers import RepeatedAugSampler
from deit_train.data.transforms import eval_transform
from deit_train.errors import ConfigError

log = logging.getLogger(__name__)

TrainCrop = Literal["rrc", "src", "none"]


class AugmentRecipe:
    """One named training recipe.

    Args:
        name: ``deit``, ``three_augment``, ``simple``, ``none`` or your own; sources with their own light
            augmentation (the digits) use theirs for ``simple`` and none at all for ``none``.
        train_crop: ``rrc`` RandomResizedCrop(``scale``, ``ratio``); ``src`` DeiT III's simple random crop
            (resize the short side to the size, random crop with 4-pixel reflect padding); ``none``: the train
            images get the eval transform (no augmentation at all, for debugging).
        hflip: horizontal flip probability.
        auto_augment: a timm policy string: ``rand-m9-mstd0.5-inc1`` (DeiT's RandAugment), ``3a`` (DeiT III:
            one of grayscale / solarize / gaussian blur per image), or null.
        color_jitter: brightness/contrast/saturation strength; timm switches it off under RandAugment
            (not under ``3a``).
        re_prob, re_mode, re_count: timm RandomErasing (DeiT: 0.25, ``pixel``, 1).
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob, mixup_mode: ``timm.data.Mixup``; both alphas
            0 = no mixing.
        label_smoothing: carried by the Mixup soft targets (without Mixup the loss applies its own).
        repeated_aug: copies of each image per epoch through :class:`RepeatedAugSampler` (1 = off), on more than
            one process.
        repeated_aug_full_epoch: see :class:`RepeatedAugSampler`.
        device: RandAugment on the device (:mod:`deit_train.data.device_augment`): workers decode (JPEG at a
            reduced DCT scale where the crop allows), crop, flip and draw the ops; the device applies them. Same
            draws as the CPU path, pixels within resampling arithmetic of it: another stream. Off: the exact CPU
            path.
        device_decode: with ``device``, the device also decodes the JPEGs (``torchvision.io.decode_jpeg``: nvjpeg
            on CUDA), crops, resizes and flips them; the workers read the bytes and make the same draws from the
            header's size. For sources of image files (folders, packs, HF); a stream of its own (the decoder is
            part of the teacher cache's key).
        repeated_aug_one_process: also on one process, as the official ``main.py`` does (its ``RASampler`` sits
            under ``if True:  # args.distributed``). There the copies of an image are neighbours in one batch
            (``[a, a, a, b, b, b, ...]``: batch augmentation, not copies spread over GPUs) and an epoch of the
            official length shows about a third of the images; off by default, so that a one-process run sees
            every image once per epoch.
    """

    def __init__(
        self,
        name: str = "simple",
        train_crop: TrainCrop = "rrc",
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        color_jitter: float | None = None,
        re_prob: float = 0.0,
        re_mode: str = "pixel",
        re_count: int = 1,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        mixup_mode: str = "batch",
        label_smoothing: float = 0.1,
        repeated_aug: int = 1,
        repeated_aug_full_epoch: bool = False,
        device: bool = False,
        repeated_aug_one_process: bool = False,
        device_decode: bool = False,
    ) -> None:
        if train_crop not in ("rrc", "src", "none"):
            raise ConfigError(f"augment.train_crop={train_crop!r}: use rrc, src or none")
        if repeated_aug < 1:
            raise ConfigError(f"augment.repeated_aug={repeated_aug}: use 1 (off) or more copies per image")
        self.name = name
        self.train_crop = train_crop
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.hflip = hflip
        self.auto_augment = auto_augment or None
        self.color_jitter = color_jitter
        self.re_prob, self.re_mode, self.re_count = re_prob, re_mode, re_count
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mixup_prob, self.mixup_switch_prob, self.mixup_mode = mixup_prob, mixup_switch_prob, mixup_mode
        self.label_smoothing = label_smoothing
        self.repeated_aug = repeated_aug
        self.repeated_aug_full_epoch = repeated_aug_full_epoch
        self.repeated_aug_one_process = repeated_aug_one_process
        self.device = bool(device)
        self.device_decode = bool(device_decode)
        if self.device_decode and not self.device:
            raise ConfigError("augment.device_decode=true needs augment.device=true (it decodes for the device "
                              "path): add augment.device=true")
        if self.device:
            self._check_device()

    def _check_device(self) -> None:
        check_device_recipe(self.auto_augment, self.train_crop, interpolation_random=False)
        if self.auto_augment is None and self.color_jitter:
            raise ConfigError(f"augment.device=true has no device ColorJitter (augment.color_jitter="
                              f"{self.color_jitter} without auto_augment): set augment.color_jitter=null or "
                              "augment.device=false")
        if self.auto_augment is not None:
            names = [op.name for op in rand_augment_transform(self.auto_augment, {}).ops]
            missing = unsupported_ops(names)
            if missing:
                raise ConfigError(f"augment.device=true has no device kernel for RandAugment op(s) "
                                  f"{', '.join(missing)} of auto_augment={self.auto_augment!r}: use "
                                  "augment.device=false")

    def __repr__(self) -> str:
        return f"AugmentRecipe({self.name})"

    @property
    def augments(self) -> bool:
        """False for the ``none`` recipe: train images are preprocessed like eval images."""
        return self.train_crop != "none"

    def train_transform(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                        interpolation: str = "bicubic", crop_pct: float = 0.875):
        """PIL image -> normalised float tensor (3, image_size, image_size)."""
        if not self.augments:
            return eval_transform(image_size, mean, std, crop_pct, interpolation)
        crop, colour, final = self._stages(image_size, mean, std, interpolation)
        return transforms.Compose(crop + colour + final)

    def _stages(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                interpolation: str) -> tuple[list, list, list]:
        """The CPU path's (crop and flip, colour, to-tensor/normalise/erasing) transforms, in order."""
        common = dict(is_training=True, interpolation=interpolation, mean=tuple(mean), std=tuple(std),
                      hflip=self.hflip, color_jitter=self.color_jitter, auto_augment=self.auto_augment,
                      re_prob=self.re_prob, re_mode=self.re_mode, re_count=self.re_count)
        crop, colour, final = create_transform(image_size, scale=self.scale, ratio=self.ratio, separate=True,
                                               **common)
        crop = list(crop.transforms)
        if self.train_crop == "src":  # DeiT III's simple random crop replaces timm's primary (crop + flip) stage
            crop = [transforms.Resize(image_size, interpolation=str_to_interp_mode(interpolation)),
                    transforms.RandomCrop(image_size, padding=4, padding_mode="reflect")]
            crop += [transforms.RandomHorizontalFlip(self.hflip)] if self.hflip > 0 else []
        return crop, list(_posterize_safe(colour).transforms), list(final.transforms)

    def worker_transform(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                         interpolation: str = "bicubic") -> WorkerTransform:
        """The loader-worker side of the uint8 path (:mod:`deit_train.data.device_augment`): the CPU stages, then
        the uint8 image with the draws of erasing (and, with ``device``, of RandAugment)."""
        crop, colour, final = self._stages(image_size, mean, std, interpolation)
        erasing = next((t for t in final if isinstance(t, RandomErasing)), None)
        draws = ErasingDraws(erasing) if erasing is not None else None
        if not self.device:
            return WorkerTransform(transforms.Compose(crop + colour), erasing=draws)
        check_device_recipe(self.auto_augment, self.train_crop, interpolation_random=interpolation == "random")
        randaugment = next((t for t in colour if isinstance(t, RandAugment)), None)
        return WorkerTransform(DraftCropFlip(image_size, self.scale, self.ratio, interpolation, self.hflip,
                                             device_decode=self.device_decode),
                               RecordedRandAugment(randaugment) if randaugment is not None else None, draws)

    def mixup(self, num_classes: int) -> Mixup | None:
        """timm Mixup/CutMix producing soft (label-smoothed) targets, or None when both alphas are 0."""
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            return None
        return Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, prob=self.mixup_prob,
                     switch_prob=self.mixup_switch_prob, mode=self.mixup_mode,
                     label_smoothing=self.label_smoothing, num_classes=num_classes)

    def sampler(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool = True,
                seed: int = 0) -> Sampler | None:
        """The repeated-augmentation sampler for this rank, or None (plain shuffling) when off."""
        if self.repeated_aug <= 1:
            return None
        if num_replicas <= 1 and not self.repeated_aug_one_process:
            log.info("augment.repeated_aug=%d is off on one process: the official DeiT main.py would still use it, "
                     "putting the %d copies of an image into one batch and showing about a third of the images per "
                     "epoch; augment.repeated_aug_one_process=true does as it does", self.repeated_aug,
                     self.repeated_aug)
            return None
        return RepeatedAugSampler(dataset, num_replicas=num_replicas, rank=rank, num_repeats=self.repeated_aug,
                                  shuffle=shuffle, full_epoch=self.repeated_aug_full_epoch, seed=seed)


def _posterize_keeping_zero_bits(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize, with "keep 0 bits" = black as under Pillow < 13 (Pillow 13 raises on it); RandAugment's
    ``PosterizeIncreasing`` asks for 0 bits at magnitude 10, which ``mstd0.5`` around m9 reaches."""
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _posterize_safe(transform: transforms.Compose) -> transforms.Compose:
    """Swaps in :func:`_posterize_keeping_zero_bits` for timm's posterize in ``transform``'s (Rand)AutoAugment."""
    for step in transform.transforms:
        ops = getattr(step, "ops", None) or [op for sub in getattr(step, "policy", []) for op in sub]
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = _posterize_keeping_zero_bits
    return transform


def build_mixup(recipe: AugmentRecipe | None, num_classes: int) -> Mixup | None:
    """For ``module.mixup``: the recipe's Mixup for ``num_classes`` classes (None without a recipe)."""
    return recipe.mixup(num_classes) if recipe is not None else None
