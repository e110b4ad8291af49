"""Image decoding that always yields 3-channel RGB, and the corrupt-file policy shared by every file source.

A corrupt or truncated file stops the run with one line naming it (:class:`CorruptImageError`), unless the source
was built with ``skip_corrupt=True``: then :class:`SkipCorrupt` serves the next readable sample instead (with its
own label, so never a wrong one) and counts the skipped files.
"""
from __future__ import annotations

import io
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from deit_train.errors import ConfigError

log = logging.getLogger(__name__)

# what PIL raises on a truncated, garbled or hostile file
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class CorruptImageError(ConfigError):
    """An image file that cannot be decoded; names the file and the option that skips such files.

    A DataLoader worker re-raises errors with its traceback folded into the message; ``str()`` keeps only
    our line so the entry point still prints one line.
    """

    _MARKER = "cannot decode image "

    def __str__(self) -> str:
        text = super().__str__()
        lines = [line for line in text.splitlines() if self._MARKER in line]
        if not lines:
            return text
        last = lines[-1]
        return last[last.index(self._MARKER):]


def corrupt_image_error(source: str, cause: BaseException) -> CorruptImageError:
    error = CorruptImageError(f"{CorruptImageError._MARKER}{source} ({type(cause).__name__}: {cause}): "
                              "delete or replace the file, or pass data.skip_corrupt=true to skip unreadable files")
    error.source = f"{source} ({type(cause).__name__}: {cause})"
    return error


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB.

    16-bit grey (``I;16*``, and ``I`` which is how PIL opens 16-bit PNGs) is scaled by 255/65535 instead of
    clipped, which is what ``Image.convert`` would do. Images with transparency are composited over white:
    the colour under a fully transparent pixel is undefined (often black), white is what viewers show.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode a file path or encoded bytes fully (so truncation shows here, not later) into an RGB image.

    Raises:
        CorruptImageError: the data is not a readable image; ``name`` (default: the path) identifies it.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            return to_rgb(image)
    except _DECODE_ERRORS as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise corrupt_image_error(label, exc) from exc


class EncodedImage:
    """An image file or its encoded bytes, opened but not decoded: :attr:`header` knows the size, :meth:`decode`
    decodes -- a JPEG possibly at a reduced DCT scale (``Image.draft``), which decodes a quarter of the pixels or
    fewer when only a smaller version is needed (the device augmentation path's crops)."""

    def __init__(self, source: str | os.PathLike | bytes, name: str | None = None) -> None:
        self.name = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
        self.source = source
        try:
            self.header = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
        except _DECODE_ERRORS as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise corrupt_image_error(self.name, exc) from exc

    @property
    def size(self) -> tuple[int, int]:
        return self.header.size

    def decode(self, at_least: tuple[int, int] | None = None) -> tuple[Image.Image, int]:
        """(RGB image, reduction): ``at_least`` (w, h) lets a JPEG decode at 1/2, 1/4 or 1/8 of its size while
        staying at least that large; ``reduction`` is that factor (1: full size, any other format)."""
        try:
            with self.header as image:
                width = image.size[0]
                drafted = image.draft(None, at_least) if at_least else None  # (mode, box), None: not a JPEG
                image.load()
                return to_rgb(image), round(width / drafted[1][2]) if drafted else 1
        except _DECODE_ERRORS as exc:
            raise corrupt_image_error(self.name, exc) from exc


    def device_jpeg(self) -> bytes | None:
        """The file's bytes when the device can decode them as the CPU path would: a complete JPEG (ending in its
        EOI marker) of RGB or greyscale pixels; else None (the worker decodes it). Without EXIF rotation, as
        :func:`load_rgb`. A CMYK/YCCK JPEG stays on the worker (libjpeg-turbo agrees with PIL on it, nvjpeg's
        conversion is not PIL's); a truncated file stays there so it fails (or is skipped) exactly as on the CPU
        path."""
        if self.header.format != "JPEG" or self.header.mode not in ("RGB", "L"):
            return None
        data = self.source if isinstance(self.source, bytes) else Path(self.source).read_bytes()
        if data.rstrip(b"\0")[-2:] != b"\xff\xd9":
            return None
        self.header.close()  # the worker does not decode it: no file left open per sample
        return data


def encoded_image(path: str) -> EncodedImage:
    """``ImageFolder(loader=...)`` for the device augmentation path: the file opened, decoded by the transform."""
    return EncodedImage(Path(path))


def pil_loader(path: str) -> Image.Image:
    """``torchvision.datasets.ImageFolder(loader=...)`` compatible :func:`load_rgb`."""
    return load_rgb(Path(path))


class SkipCorrupt(Dataset):
    """Wraps a map-style dataset whose ``__getitem__`` raises :class:`CorruptImageError` on unreadable files.

    A corrupt sample is replaced by the next readable index (wrapping around), which keeps the batch size
    that Mixup needs. The count is shared by DataLoader workers (a process-shared integer) and logged once
    per newly skipped file; :attr:`skipped` reads it back in the main process.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._skipped = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def skipped(self) -> int:
        return self._skipped.value

    def __getitem__(self, index: int):
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except CorruptImageError as exc:
                if offset == 0:  # the same file is counted once per visit, not once per retry chain
                    with self._skipped.get_lock():
                        self._skipped.value += 1
                        count = self._skipped.value
                    log.warning("skipped corrupt image %s (%d so far)", getattr(exc, "source", exc), count)
        raise ConfigError("every image of the data set failed to decode: check data.root / data.path")

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, transform) -> None:  # replaced by wrappers such as SimMIM's data module
        self.dataset.transform = transform

    def __getattr__(self, name: str):  # classes, targets, ... of the wrapped dataset
        if name in ("dataset", "_skipped"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
