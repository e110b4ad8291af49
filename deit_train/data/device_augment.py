"""uint8 crops from the loader workers, the float work on the device: what timm's prefetch loader does, on the
deterministic stream.

Today's CPU path runs the whole recipe per sample in a worker and ships a normalised float image. Here a worker
ships the uint8 crop (a quarter of the bytes pinned and copied) with the sample's recorded random draws
(:class:`DeviceImages`); after the transfer, :class:`DeviceFinish` applies the rest to the batch on the device.

- **uint8 workers** (``data.uint8_workers``, on by default): the worker runs the recipe's crop, flip and colour
  stages exactly as today, then draws random erasing's boxes with timm's own ``RandomErasing`` (on a probe that
  records instead of writing) and keeps torch's generator state from before the erasing noise. On the device:
  ``/255`` and normalisation looked up in a table the CPU path's arithmetic computed on the host (no division on the
  device, where CUDA's differs), then the erasing noise regenerated on the CPU from that state by timm's
  ``_get_pixels``. The batches are **bit-identical** to the CPU path on every device.
- **RandAugment on the device** (``augment.device=true``): the worker decodes (JPEG at a reduced DCT scale where
  the sampled crop is at least twice the output: the box is drawn from the header's size first), crops and
  flips, and runs timm's ``RandAugment`` with recording ops: every draw is timm's own, so crops, flips, ops and
  magnitudes equal the CPU path's for the same seed. The device applies the recorded ops with
  ``torchvision.transforms.v2.functional`` kernels, grouped by op. Pixels differ from the CPU path by resampling
  arithmetic (tensor kernels resample bilinearly where timm's PIL ops are bicubic; the reduced-DCT decode): a
  different stream, which the teacher cache keys separately (:func:`device_identity`).
- **decode on the device too** (``augment.device_decode=true``, with ``augment.device=true``): the worker reads
  the JPEG's bytes and header and makes every draw above from the header's size (no pixels: the RandAugment and
  erasing draws need none), then ships the bytes and the draws. The device decodes the batch with
  ``torchvision.io.decode_jpeg`` (nvjpeg on CUDA, libjpeg-turbo on CPU), crops and resizes (bicubic, antialiased)
  and flips with ``torchvision.transforms.v2.functional``, then runs the stages above. A sample the device cannot
  decode as the CPU path would (not a JPEG, CMYK, truncated: :meth:`EncodedImage.device_jpeg`) is decoded and
  cropped in the worker as on the device path without it, and ships its crop.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing, _get_pixels
from timm.data.transforms import RandomResizedCropAndInterpolation, str_to_interp_mode
from torch import Tensor
from torch.utils.data import default_collate
from torch.utils.data._utils.collate import collate as _collate, default_collate_fn_map
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F1
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as F

from deit_train.data.images import CorruptImageError, EncodedImage
from deit_train.errors import ConfigError


class DeviceImages(NamedTuple):
    """A worker's uint8 image (3, H, W) and its recorded draws; collated into a batch by
    :func:`collate_device_images`."""

    image: Tensor
    params: dict


def collate_device_images(samples: Sequence[DeviceImages], *, collate_fn_map=None) -> DeviceImages:
    """The batch of :class:`DeviceImages`: the images stacked (a uint8 tensor, which the loader pins and Lightning
    moves), the draws as numpy arrays. Collated in the worker, so that no draw is a tensor when Lightning's precision
    plugin converts the batch's floating tensors (``trainer.precision=bf16-true`` would round the RandAugment
    magnitudes to bf16) or moves it: the draws stay on the host, where the device stage reads them without a sync."""
    images = default_collate([sample.image for sample in samples])
    params = default_collate([sample.params for sample in samples])
    return DeviceImages(images, {k: v.numpy() if isinstance(v, Tensor) else v for k, v in params.items()})


def collate(samples: list):
    """``default_collate``, with :func:`collate_device_images` for the uint8 path's samples (a loader's
    ``collate_fn``)."""
    return _collate(samples, collate_fn_map=_COLLATE_MAP)


# ---- the worker side -----------------------------------------------------------------------------------------

class _BoxProbe:
    """Stands in for the image in timm's ``RandomErasing._erase``: records the boxes it would write."""

    def __init__(self) -> None:
        self.boxes: list[tuple[int, int, int, int]] = []

    def __setitem__(self, key, value) -> None:
        _, rows, cols = key
        self.boxes.append((rows.start, cols.start, rows.stop - rows.start, cols.stop - cols.start))


class ErasingDraws:
    """timm's ``RandomErasing`` draws of one sample, made in the worker at the point the CPU path makes them."""

    def __init__(self, eraser: RandomErasing) -> None:
        self.per_pixel, self.rand_color = eraser.per_pixel, eraser.rand_color  # the device's fill
        self.eraser = copy.copy(eraser)
        # the probe's fill is a constant: the noise is not drawn here, so torch's generator stays where the CPU
        # path has it when it draws the noise (the box draws are python's ``random``, whatever the fill)
        self.eraser.per_pixel = self.eraser.rand_color = False
        self.eraser.device = "cpu"

    def __call__(self, shape: Sequence[int]) -> dict:
        """The draws for an image of ``shape`` (channels, height, width)."""
        state = torch.random.get_rng_state()
        probe = _BoxProbe()
        self.eraser._erase(probe, *shape, torch.float32)
        boxes = np.zeros((self.eraser.max_count, 4), dtype=np.int32)
        for row, box in enumerate(probe.boxes):
            boxes[row] = box
        return {"erase_boxes": torch.from_numpy(boxes), "erase_rng": state}


class _RecordingOp:
    """Replaces a RandAugment op's image function: records (op, level argument) and leaves the image alone."""

    def __init__(self, index: int, log: list) -> None:
        self.index, self.log = index, log

    def __call__(self, img, *level_args, **kwargs):
        self.log.append((self.index, float(level_args[0]) if level_args else 0.0))
        return img


class RecordedRandAugment:
    """timm's ``RandAugment`` itself (its ``np.random.choice`` of ops, its prob/magnitude/sign draws), with ops
    that record instead of transforming the image."""

    def __init__(self, randaugment: RandAugment) -> None:
        self.randaugment = copy.deepcopy(randaugment)
        self.names = [op.name for op in self.randaugment.ops]
        self.fill = tuple(self.randaugment.ops[0].kwargs["fillcolor"]) if self.randaugment.ops else (128,) * 3
        self.num_layers = randaugment.num_layers
        self._log: list = []
        for index, op in enumerate(self.randaugment.ops):
            op.aug_fn = _RecordingOp(index, self._log)

    def __call__(self, img) -> dict:
        """``img`` is never looked at (the ops record): None where the worker has no pixels (device decode)."""
        self._log.clear()
        self.randaugment(img)
        ops = np.full(self.num_layers, -1, dtype=np.int16)
        args = np.zeros(self.num_layers, dtype=np.float64)
        for layer, (index, arg) in enumerate(self._log):
            ops[layer], args[layer] = index, arg
        return {"ra_ops": torch.from_numpy(ops), "ra_args": torch.from_numpy(args)}


class DraftCropFlip:
    """timm's RandomResizedCrop (its ``get_params`` draws on the header's size) and torchvision's flip draw; a
    JPEG (:class:`EncodedImage`) is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that keeps the crop at least
    the output size, so a crop at least twice the output decodes a quarter of the pixels or fewer.

    ``device_decode``: a JPEG the device can decode (:meth:`EncodedImage.device_jpeg`) is not decoded here; the
    call returns (None, record) with the file's bytes in ``record["jpeg"]``, and the device crops it
    (:meth:`DeviceFinish.decode`). The draws are the same either way: the decode consumes none.
    """

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], interpolation: str,
                 hflip: float, device_decode: bool = False) -> None:
        self.size, self.scale, self.ratio, self.hflip = size, tuple(scale), tuple(ratio), hflip
        self.interpolation = str_to_interp_mode(interpolation)
        self.device_decode = device_decode

    def __call__(self, image) -> tuple[Image.Image | None, dict]:
        header = image.header if isinstance(image, EncodedImage) else image
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(header, self.scale, self.ratio)
        jpeg = image.device_jpeg() if self.device_decode and isinstance(image, EncodedImage) else None
        if jpeg is not None:
            flip = self.flip_draw()
            return None, {"crop": torch.tensor([top, left, height, width], dtype=torch.int32),
                          "flip": torch.tensor(flip), "reduction": torch.tensor(1, dtype=torch.int8),
                          "jpeg": jpeg, "name": image.name}
        if isinstance(image, EncodedImage):
            full_w, full_h = header.size
            image, reduction = image.decode(at_least=(math.ceil(full_w * self.size / width),
                                                      math.ceil(full_h * self.size / height)))
        else:
            reduction = 1
        if reduction == 1:  # exactly the CPU path's crop
            crop = F1.resized_crop(image, top, left, height, width, [self.size, self.size], self.interpolation)
        else:
            box = (left / reduction, top / reduction, (left + width) / reduction, (top + height) / reduction)
            crop = image.resize((self.size, self.size), F1.pil_modes_mapping[self.interpolation], box=box)
        flip = self.flip_draw()
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        record = {"crop": torch.tensor([top, left, height, width], dtype=torch.int32), "flip": torch.tensor(flip),
                  "reduction": torch.tensor(reduction, dtype=torch.int8)}
        if self.device_decode:  # every sample of a batch has the same keys (collation)
            record.update(jpeg=b"", name=getattr(image, "name", ""))
        return crop, record

    def flip_draw(self) -> bool:
        """torchvision ``RandomHorizontalFlip``'s draw, after the crop box's (as the CPU path draws them)."""
        return self.hflip > 0 and bool(torch.rand(1) < self.hflip)


class WorkerTransform:
    """PIL image (or :class:`EncodedImage`) -> :class:`DeviceImages`: the CPU stages of a recipe, then the uint8
    image with the draws of the device stages.

    Args:
        crop: PIL -> PIL (the recipe's crop, flip and colour stages: the uint8 path), or a :class:`DraftCropFlip`
            (the device path) returning (PIL, record).
        randaugment: :class:`RecordedRandAugment` (device path) or None.
        erasing: :class:`ErasingDraws` or None.
    """

    def __init__(self, crop, randaugment: RecordedRandAugment | None = None,
                 erasing: ErasingDraws | None = None) -> None:
        self.crop, self.randaugment, self.erasing = crop, randaugment, erasing

    def __call__(self, image) -> DeviceImages:
        params: dict = {}
        image = self.crop(image)
        if isinstance(image, tuple):
            image, params = image
        if self.randaugment is not None:
            params.update(self.randaugment(image))
        pixels = F1.pil_to_tensor(image) if image is not None else None
        if self.erasing is not None:
            params.update(self.erasing(pixels.shape if pixels is not None else (3, self.crop.size, self.crop.size)))
        if "jpeg" not in params:
            return DeviceImages(pixels, params)
        # device decode: every image field is empty (the batch's images differ in size); a crop made here (a sample
        # the device cannot decode) travels as bytes beside the JPEGs
        params["decoded"] = pixels.numpy().tobytes() if pixels is not None else b""
        return DeviceImages(_NO_PIXELS, params)

    def finish(self, mean: Sequence[float], std: Sequence[float]) -> "DeviceFinish":
        """The device side matching this worker side."""
        erasing = self.erasing
        return DeviceFinish(mean, std, self.randaugment.names if self.randaugment is not None else None,
                            self.randaugment.fill if self.randaugment is not None else (128, 128, 128),
                            per_pixel=bool(erasing and erasing.per_pixel),
                            rand_color=bool(erasing and erasing.rand_color),
                            decode_size=self.crop.size if getattr(self.crop, "device_decode", False) else None)


_COLLATE_MAP = {**default_collate_fn_map, DeviceImages: collate_device_images}
_NO_PIXELS = torch.empty(0, dtype=torch.uint8)  # the image field of a device-decode sample; moved to the device,
# it tells the device stage where the batch goes


# ---- the device side -----------------------------------------------------------------------------------------

def _solarize_add(images: Tensor, add: float, thresh: int = 128) -> Tensor:
    """timm's ``solarize_add`` LUT (torchvision has no kernel for it): exact integer arithmetic."""
    added = (images.to(torch.int16) + int(add)).clamp_(max=255).to(torch.uint8)
    return torch.where(images < thresh, added, images)


def _solarize(images: Tensor, thresh: float) -> Tensor:
    return images if thresh > 255 else F.solarize(images, thresh)  # PIL inverts nothing at 256; v2 refuses it


def _affine(images: Tensor, fill, shear=(0.0, 0.0), translate=(0.0, 0.0)) -> Tensor:
    """timm's PIL ``AFFINE`` shear/translate about the top-left corner (``center=[0, 0]``, as torchvision's own
    RandAugment maps them)."""
    return F.affine(images, angle=0.0, translate=list(translate), scale=1.0, shear=list(shear),
                    interpolation=InterpolationMode.BILINEAR, fill=fill, center=[0, 0])


# timm op name -> (kernel(images, level argument, fill), grouping): "batch" = one call for every image with the op,
# "by_value" = one call per distinct (integer) argument, "each" = one call per image (a continuous magnitude)
_KERNELS = {
    "AutoContrast": (lambda x, a, fill: F.autocontrast(x), "batch"),
    "Equalize": (lambda x, a, fill: F.equalize(x), "batch"),
    "Invert": (lambda x, a, fill: F.invert(x), "batch"),
    "Posterize": (lambda x, a, fill: F.posterize(x, int(a)), "by_value"),
    "PosterizeIncreasing": (lambda x, a, fill: F.posterize(x, int(a)), "by_value"),
    "PosterizeOriginal": (lambda x, a, fill: F.posterize(x, int(a)), "by_value"),
    "Solarize": (lambda x, a, fill: _solarize(x, a), "by_value"),
    "SolarizeIncreasing": (lambda x, a, fill: _solarize(x, a), "by_value"),
    "SolarizeAdd": (lambda x, a, fill: _solarize_add(x, a), "by_value"),
    "Rotate": (lambda x, a, fill: F.rotate(x, a, interpolation=InterpolationMode.BILINEAR, fill=fill), "each"),
    "Color": (lambda x, a, fill: F.adjust_saturation(x, a), "each"),
    "ColorIncreasing": (lambda x, a, fill: F.adjust_saturation(x, a), "each"),
    "Contrast": (lambda x, a, fill: F.adjust_contrast(x, a), "each"),
    "ContrastIncreasing": (lambda x, a, fill: F.adjust_contrast(x, a), "each"),
    "Brightness": (lambda x, a, fill: F.adjust_brightness(x, a), "each"),
    "BrightnessIncreasing": (lambda x, a, fill: F.adjust_brightness(x, a), "each"),
    "Sharpness": (lambda x, a, fill: F.adjust_sharpness(x, a), "each"),
    "SharpnessIncreasing": (lambda x, a, fill: F.adjust_sharpness(x, a), "each"),
    "ShearX": (lambda x, a, fill: _affine(x, fill, shear=(math.degrees(math.atan(a)), 0.0)), "each"),
    "ShearY": (lambda x, a, fill: _affine(x, fill, shear=(0.0, math.degrees(math.atan(a)))), "each"),
    "TranslateX": (lambda x, a, fill: _affine(x, fill, translate=(-a, 0.0)), "each"),
    "TranslateY": (lambda x, a, fill: _affine(x, fill, translate=(0.0, -a)), "each"),
    "TranslateXRel": (lambda x, a, fill: _affine(x, fill, translate=(-a * x.shape[-1], 0.0)), "each"),
    "TranslateYRel": (lambda x, a, fill: _affine(x, fill, translate=(0.0, -a * x.shape[-2])), "each"),
}


def unsupported_ops(names: Sequence[str]) -> list[str]:
    """RandAugment ops the device path has no kernel for."""
    return [name for name in names if name not in _KERNELS]


def apply_op(name: str, images: Tensor, arg: float, fill: Sequence[float]) -> Tensor:
    """One recorded op on uint8 images (..., 3, H, W) with its level argument."""
    return _KERNELS[name][0](images, arg, list(fill))


class DeviceFinish:
    """The batch after transfer: recorded RandAugment ops (grouped by op), ``/255`` and normalisation, erasing.

    What crosses to the device per batch, whatever its size: the uint8 images (Lightning moves them), at most one
    copy of the RandAugment groups' row indices, one of the erasing noise and one of the crops the workers decoded
    (``augment.device_decode``); each from pinned memory on CUDA, none waited for on the host. The draws are numpy
    arrays on the host (:func:`collate_device_images`); nothing here reads a device tensor back.

    Args:
        mean, std: the normalisation.
        op_names: the recipe's RandAugment op list (indices of ``ra_ops``), or None without device RandAugment.
        fill: RandAugment's fill colour (timm: the mean in 0-255).
        per_pixel, rand_color: timm RandomErasing's fill (``pixel`` mode, ``rand`` mode; neither: zeros).
        decode_size: the output size when the batch arrives as JPEG bytes (``augment.device_decode``), else None.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], op_names: Sequence[str] | None = None,
                 fill: Sequence[float] = (128, 128, 128), per_pixel: bool = True, rand_color: bool = False,
                 decode_size: int | None = None) -> None:
        self.decode_size = decode_size
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.op_names = list(op_names) if op_names is not None else None
        self.fill = [float(f) for f in fill]
        self.per_pixel, self.rand_color = per_pixel, rand_color
        self.table = normalisation_table(self.mean, self.std)
        self._tables: dict[torch.device, Tensor] = {}
        self._decode_streams: dict[torch.device, object] = {}

    def __call__(self, batch: DeviceImages) -> Tensor:
        params = dict(batch.params)
        encoded = {key: params.pop(key) for key in ("jpeg", "decoded", "name") if key in params}  # lists of bytes
        # numpy from the loader's collation; a CPU tensor's .numpy() is a view (a device tensor's raises: no sync)
        params = {k: v.numpy() if isinstance(v, Tensor) else np.asarray(v) for k, v in params.items()}
        images = batch.image
        if encoded:
            images = self.decode(encoded["jpeg"], encoded["decoded"], encoded["name"], params["crop"],
                                 params["flip"], images.device)
        if self.op_names is not None and "ra_ops" in params:
            images = self.rand_augment(images, params["ra_ops"], params["ra_args"])
        images = self.normalise(images)
        if "erase_boxes" in params:
            self.erase(images, params["erase_boxes"], params["erase_rng"])
        return images

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 (N, 3, H, W) -> float32, each value looked up in :func:`normalisation_table`: the worker path's
        bits on every device (no division runs on the device)."""
        table = self._tables.get(images.device)
        if table is None:
            table = self._tables[images.device] = self.table.to(images.device)  # once per device
        channels = images.shape[1]
        offsets = torch.arange(0, 256 * channels, 256, dtype=torch.int32, device=images.device).view(1, -1, 1, 1)
        index = images.to(torch.int32).add_(offsets)
        return table.view(-1).index_select(0, index.reshape(-1)).view(images.shape)

    def decode(self, jpegs: Sequence[bytes], decoded: Sequence[bytes], names: Sequence[str], crops: np.ndarray,
               flips: np.ndarray, device: torch.device) -> Tensor:
        """uint8 (N, 3, size, size) crops: the JPEGs decoded in one batched call on ``device``, each cropped to its
        box and resized (bicubic, antialiased, as PIL's resize filters) and flipped as drawn; the crops the workers
        made (``decoded``, where ``jpegs`` is empty) as they are, in one copy."""
        size = self.decode_size
        out = torch.empty((len(jpegs), 3, size, size), dtype=torch.uint8, device=device)
        todo = [i for i, data in enumerate(jpegs) if data]
        if todo:
            for i, image in zip(todo, self._decode_jpegs([jpegs[i] for i in todo], [names[i] for i in todo],
                                                         device)):
                top, left, height, width = (int(v) for v in crops[i])
                crop = F.resized_crop(image, top, left, height, width, [size, size],
                                      interpolation=InterpolationMode.BICUBIC, antialias=True)
                out[i] = F.horizontal_flip(crop) if flips[i] else crop
        made = [i for i, data in enumerate(decoded) if data]
        if made:
            host = torch.frombuffer(bytearray(b"".join(decoded[i] for i in made)), dtype=torch.uint8)
            crops_made = _to_device(host, device).view(len(made), 3, size, size)
            for row, i in enumerate(made):
                out[i] = crops_made[row]
        return out

    def _decode_jpegs(self, jpegs: Sequence[bytes], names: Sequence[str], device: torch.device) -> list[Tensor]:
        """``decode_jpeg`` of the batch (EXIF orientation ignored, as the CPU path's PIL decode does); a file it
        cannot decode stops the run with one line naming it (decoded one by one to find it)."""
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in jpegs]
        try:
            return self.decode_after_current_stream(tensors, device)
        except RuntimeError:
            for tensor, name in zip(tensors, names):
                try:
                    self.decode_after_current_stream([tensor], device)
                except RuntimeError as exc:
                    cause = str(exc).strip().splitlines()[-1].rsplit(", ", 1)[-1]  # not the C++ source position
                    raise CorruptImageError(f"{CorruptImageError._MARKER}{name} on the device ({cause}): delete or "
                                            "replace the file, or decode in the workers (augment.device_decode=false"
                                            ", which data.skip_corrupt=true can skip)") from exc
            raise

    def decode_after_current_stream(self, tensors: list[Tensor], device: torch.device) -> list[Tensor]:
        """``decode_jpeg`` on ``device``, its outputs safe to use on the current stream.

        On CUDA, torchvision 0.19-0.29 (``decode_jpegs_cuda.cpp``) allocates the outputs on the caller's current
        stream and has nvJPEG write them from a private stream that never waits on the caller's: a block the
        caching allocator just freed on the current stream (step N's activations, still read by its queued
        backward) can be overwritten. So the call runs with a side stream current (its outputs come from the side
        stream's blocks, which no queued kernel of the training stream reads); the current stream waits for the
        decode, and each output is marked used there (``record_stream``: its block is handed out again only after
        the current stream's work on it has finished). Elsewhere: ``decode_jpeg`` itself."""
        if device.type != "cuda":
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        current = torch.cuda.current_stream(device)
        side = self._decode_streams.get(device)
        if side is None:
            side = self._decode_streams[device] = torch.cuda.Stream(device)
        side.wait_stream(current)  # whatever the current stream queued before the batch came is done first
        with torch.cuda.stream(side):
            images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
        current.wait_stream(side)
        for image in images:
            image.record_stream(current)
        return images

    def rand_augment(self, images: Tensor, ops: np.ndarray, args: np.ndarray) -> Tensor:
        """The recorded ops, layer by layer: a group of rows that is one run of the batch is a slice, the other
        groups are slices of one index tensor copied to the device once per batch. The caller's batch is left as it
        was (one copy per batch)."""
        plan, scattered = [], []  # (op name, rows: slice of the batch or of the index tensor, level argument)
        offset = 0
        for layer in range(ops.shape[1]):
            for index in np.unique(ops[:, layer]):
                if index < 0:
                    continue
                name = self.op_names[index]
                rows = np.flatnonzero(ops[:, layer] == index)
                kind = _KERNELS[name][1]
                if kind == "batch":
                    groups = [(rows, 0.0)]
                elif kind == "by_value":
                    groups = [(rows[args[rows, layer] == value], value) for value in np.unique(args[rows, layer])]
                else:
                    groups = [(rows[i:i + 1], args[rows[i], layer]) for i in range(len(rows))]
                for members, arg in groups:
                    if members[-1] - members[0] + 1 == len(members):  # consecutive rows
                        plan.append((name, False, slice(int(members[0]), int(members[-1]) + 1), float(arg)))
                    else:
                        plan.append((name, True, slice(offset, offset + len(members)), float(arg)))
                        scattered.append(members)
                        offset += len(members)
        if not plan:
            return images
        indices = _to_device(torch.from_numpy(np.concatenate(scattered)), images.device) if scattered else None
        images = images.clone()
        for name, indexed, rows, arg in plan:
            if indexed:
                select = indices[rows]
                images.index_copy_(0, select, apply_op(name, images.index_select(0, select), arg, self.fill))
            else:
                images[rows] = apply_op(name, images[rows], arg, self.fill)
        return images

    def erase(self, images: Tensor, boxes: np.ndarray, states: np.ndarray) -> None:
        """timm's erasing noise, drawn on the CPU from each sample's generator state (what the worker's
        ``RandomErasing`` would have drawn next) into one buffer, copied once, written into the boxes."""
        channels = images.shape[1]
        erased = [(int(sample), [tuple(int(v) for v in box) for box in boxes[sample] if box[2]])
                  for sample in np.flatnonzero(boxes[:, :, 2].any(axis=1))]
        if not erased:
            return
        if not (self.per_pixel or self.rand_color):  # timm's constant fill is zeros and draws nothing
            for sample, sample_boxes in erased:
                for top, left, height, width in sample_boxes:
                    images[sample, :, top:top + height, left:left + width] = 0.0
            return
        # the noise's shape per box: timm's _get_pixels gives (C, h, w) per pixel, (C, 1, 1) for a random colour
        shapes = [[(channels, height, width) if self.per_pixel else (channels, 1, 1) for _, _, height, width in b]
                  for _, b in erased]
        noise = torch.empty(sum(math.prod(shape) for sample in shapes for shape in sample), dtype=torch.float32,
                            pin_memory=images.device.type == "cuda")
        offset = 0
        for sample, sample_boxes in erased:
            with torch.random.fork_rng(devices=[]):
                torch.random.set_rng_state(torch.from_numpy(np.ascontiguousarray(states[sample])))
                for _, _, height, width in sample_boxes:
                    pixels = _get_pixels(self.per_pixel, self.rand_color, (channels, height, width),
                                         dtype=torch.float32, device="cpu")
                    noise[offset:offset + pixels.numel()] = pixels.view(-1)
                    offset += pixels.numel()
        noise = _to_device(noise, images.device)
        offset = 0
        for (sample, sample_boxes), sample_shapes in zip(erased, shapes):
            for (top, left, height, width), shape in zip(sample_boxes, sample_shapes):
                size = math.prod(shape)
                images[sample, :, top:top + height, left:left + width] = noise[offset:offset + size].view(shape)
                offset += size


def normalisation_table(mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(channels, 256) float32: every byte value through the worker path's own arithmetic on the CPU (torchvision
    v1 ``ToTensor``'s ``/255``, then ``Normalize``: v2's ``ToDtype`` multiplies by 1/255, which is not the same
    bits). Looked up rather than recomputed on the device, where CUDA divides by a host scalar by multiplying with
    its float32 reciprocal (1 ulp off for 126 of the 256 values)."""
    values = torch.arange(256, dtype=torch.uint8).expand(len(mean), 1, 256)
    return F1.normalize(values.float().div(255), list(mean), list(std)).view(len(mean), 256).contiguous()


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """One host-to-device copy that the host does not wait for (from pinned memory on CUDA; the tensor itself on the
    CPU). Always ``Tensor.to``, so that a test counting transfers sees every one the device stage makes."""
    if device.type == "cuda" and not host.is_pinned():
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def device_identity(device: torch.device | str, decode: bool = False) -> dict:
    """What the device path's pixels depend on beyond the recipe: the kernels' library versions and the device;
    with ``decode``, the JPEG decoder too (nvjpeg and libjpeg-turbo round differently)."""
    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    identity = {"backend": "torchvision.transforms.v2.functional", "torch": torch.__version__,
                "torchvision": torchvision.__version__, "device": name}
    if decode:
        decoder = "nvjpeg" if device.type == "cuda" else "libjpeg-turbo"
        identity["decode"] = f"torchvision.io.decode_jpeg ({decoder}), resized_crop bicubic antialias"
    return identity


def check_device_recipe(auto_augment: str | None, train_crop: str, interpolation_random: bool) -> None:
    """One line when ``augment.device=true`` meets a recipe it cannot run."""
    if train_crop != "rrc":
        raise ConfigError(f"augment.device=true supports augment.train_crop=rrc, not {train_crop}: use "
                          "augment.device=false")
    if auto_augment is None:
        return
    if not auto_augment.startswith("rand"):
        raise ConfigError(f"augment.device=true runs RandAugment policies (rand-...), not auto_augment="
                          f"{auto_augment!r}: use augment.device=false")
    if interpolation_random:
        raise ConfigError("augment.device=true needs a fixed interpolation (data.interpolation=random draws one "
                          "per op on the CPU): set data.interpolation=bicubic")
