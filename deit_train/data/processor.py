"""Inference preprocessing with the DeiTImageProcessor interface, giving the numbers of our eval transform
(timm's: resize the short side to ``crop_size / crop_pct`` bicubic, center crop, rescale 1/255, normalise).

Unlike ``transformers.DeiTImageProcessor``, an int ``size`` (or ``{"shortest_edge": n}``) keeps the aspect
ratio, as the training-time eval transform does; ``{"height": h, "width": w}`` resizes to exactly that.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import str_to_interp_mode
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from deit_train.data.images import to_rgb


def _hw(size: int | Mapping[str, int]) -> int | tuple[int, int]:
    """An int (short side) or (height, width)."""
    if isinstance(size, Mapping):
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
        return int(size["height"]), int(size["width"])
    return int(size)


class DeiTImageProcessor:
    """``processor(images, return_tensors="pt") -> {"pixel_values": (N, 3, H, W) float32}``.

    ``images``: a PIL image, a numpy array or tensor (HWC, CHW or HW; uint8 or float), a batch of them
    (list, or a 4-d array NHWC / NCHW). uint8 and PIL inputs go through PIL exactly like the eval transform;
    float inputs are resized as tensors (antialiased bicubic) and taken as already in ``[0, 255]`` when
    ``do_rescale`` (pass ``do_rescale=False`` for ``[0, 1]`` floats). Keyword arguments of the call override the
    instance settings for that call, as in transformers.
    """

    def __init__(
        self,
        do_resize: bool = True,
        size: int | Mapping[str, int] | None = None,
        resample: str = "bicubic",
        do_center_crop: bool = True,
        crop_size: int | Mapping[str, int] = 224,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        crop_pct: float = 0.875,
    ) -> None:
        crop = _hw(crop_size)
        if size is None:  # timm / DeiT: short side = floor(crop / crop_pct), 256 for 224, 438 for 384
            size = math.floor((crop if isinstance(crop, int) else min(crop)) / crop_pct)
        self.do_resize, self.size, self.resample = do_resize, size, resample
        self.do_center_crop, self.crop_size = do_center_crop, crop_size
        self.do_rescale, self.rescale_factor = do_rescale, rescale_factor
        self.do_normalize, self.image_mean, self.image_std = do_normalize, tuple(image_mean), tuple(image_std)

    @classmethod
    def from_eval_config(cls, image_size: int, crop_pct: float = 0.875, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                         std: Sequence[float] = IMAGENET_DEFAULT_STD, interpolation: str = "bicubic"):
        """The processor equal to ``deit_train.data.transforms.eval_transform`` with these arguments."""
        return cls(crop_size=image_size, crop_pct=crop_pct, image_mean=mean, image_std=std, resample=interpolation)

    def to_dict(self) -> dict[str, Any]:
        size = _hw(self.size)
        crop = _hw(self.crop_size)
        return {
            "image_processor_type": "DeiTImageProcessor",
            "do_resize": self.do_resize,
            "size": {"shortest_edge": size} if isinstance(size, int) else {"height": size[0], "width": size[1]},
            "resample": int(Image.Resampling[self.resample.upper()]),
            "do_center_crop": self.do_center_crop,
            "crop_size": {"height": crop, "width": crop} if isinstance(crop, int) else
            {"height": crop[0], "width": crop[1]},
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
        }

    # ---- one image ----------------------------------------------------------------------------------
    def _geometry(self, s: dict) -> list:
        ops = []
        if s["do_resize"]:
            ops.append(v2.Resize(_hw(s["size"]), interpolation=str_to_interp_mode(s["resample"]), antialias=True))
        if s["do_center_crop"]:
            ops.append(v2.CenterCrop(_hw(s["crop_size"])))
        return ops

    def _one(self, image: Any, s: dict) -> Tensor:
        if isinstance(image, Image.Image) or (_array(image) is not None and _array(image).dtype == np.uint8):
            pil = to_rgb(image if isinstance(image, Image.Image) else Image.fromarray(_hwc(_array(image), rgb=False)))
            for op in self._geometry(s):
                pil = op(pil)
            pixels = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy()).permute(2, 0, 1)
        else:
            array = _array(image)
            if array is None:
                raise TypeError(f"unsupported image type {type(image).__name__}: PIL image, numpy array or tensor")
            pixels = torch.from_numpy(_hwc(array).astype(np.float32)).permute(2, 0, 1).contiguous()
            for op in self._geometry(s):
                pixels = op(pixels)
        if s["do_rescale"]:
            pixels = pixels * s["rescale_factor"]
        if s["do_normalize"]:
            pixels = TF.normalize(pixels, list(s["image_mean"]), list(s["image_std"]))
        return pixels

    # ---- public --------------------------------------------------------------------------------------
    def __call__(self, images: Any, return_tensors: str | None = "pt", **overrides) -> dict[str, Any]:
        settings = {k: overrides.get(k, getattr(self, k)) for k in (
            "do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std")}
        pixel_values = torch.stack([self._one(image, settings) for image in _as_batch(images)])
        if return_tensors in ("pt", None):
            return {"pixel_values": pixel_values}
        if return_tensors == "np":
            return {"pixel_values": pixel_values.numpy()}
        raise ValueError(f"return_tensors={return_tensors!r}: use 'pt' or 'np'")

    preprocess = __call__


def _array(image: Any) -> np.ndarray | None:
    if isinstance(image, Tensor):
        return image.detach().cpu().numpy()
    if isinstance(image, np.ndarray):
        return image
    return None


def _hwc(array: np.ndarray, rgb: bool = True) -> np.ndarray:
    """HW, HWC or CHW -> HWC with 3 channels (``rgb=False``: as PIL takes it, HW grey / RGB / RGBA)."""
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image HW, HWC or CHW with 1, 3 or 4 channels, got shape {array.shape}")
    if not rgb:
        return np.ascontiguousarray(array[..., 0] if array.shape[-1] == 1 else array)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[..., :3]
    return np.ascontiguousarray(array)


def _as_batch(images: Any) -> list:
    if isinstance(images, (list, tuple)):
        return list(images)
    array = _array(images)
    if array is not None and array.ndim == 4:
        return list(images)
    return [images]
