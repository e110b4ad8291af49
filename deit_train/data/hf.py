"""HuggingFace ``datasets`` sources: a ``save_to_disk`` folder, or ``load_dataset`` on a builder / local files
(parquet, arrow, imagefolder, ...), map-style or streamed.

Images are decoded by :func:`deit_train.data.images.load_rgb` (any mode -> RGB, corrupt-file policy), not by
``datasets``: the image column is read undecoded (bytes / path).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset

from deit_train.data.augmented import AugmentedDataModule
from deit_train.data.images import CorruptImageError, EncodedImage, load_rgb, to_rgb
from deit_train.data.stream import StoppingLoader
from deit_train.errors import ConfigError

log = logging.getLogger(__name__)


def decode_image(value: Any, where: str, encoded: bool = False) -> Image.Image | EncodedImage:
    """An image cell (undecoded ``{"bytes", "path"}``, PIL image, array or raw bytes) -> RGB PIL image;
    ``encoded``: bytes and paths opened undecoded (:class:`EncodedImage`), for the transform to decode."""
    load = EncodedImage if encoded else load_rgb
    if isinstance(value, Mapping):
        if value.get("bytes") is not None:
            return load(value["bytes"], name=value.get("path") or where)
        if value.get("path"):
            return load(Path(value["path"]))
    if isinstance(value, Image.Image):
        return to_rgb(value)
    if isinstance(value, bytes):
        return load(value, name=where)
    if isinstance(value, np.ndarray) or isinstance(value, list):
        array = np.asarray(value)
        if array.dtype != np.uint8:
            raise ConfigError(f"{where}: image arrays must be uint8 HWC or HW, got {array.dtype}")
        return to_rgb(Image.fromarray(array))
    raise CorruptImageError(f"{CorruptImageError._MARKER}{where} (unsupported cell {type(value).__name__}): "
                            "pass data.skip_corrupt=true to skip it, or fix data.image_column")


def _undecoded(ds, image_column: str):
    """The same dataset with its ``Image`` column left as bytes/path, so we decode (and catch) ourselves."""
    feature = (ds.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


class HFImageDataset(Dataset):
    """Map-style: item ``i`` = (transform(RGB image), int label)."""

    def __init__(self, ds: datasets.Dataset, image_column: str, label_column: str, transform: Callable | None,
                 split: str, encoded: bool = False) -> None:
        self.ds = _undecoded(ds, image_column)
        self.image_column, self.label_column, self.transform, self.split = image_column, label_column, transform, split
        self.encoded = encoded  # the transform decodes (see decode_image)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, index: int):
        row = self.ds[int(index)]
        image = decode_image(row[self.image_column], f"{self.split}[{index}]", self.encoded)
        return (self.transform(image) if self.transform else image), int(row[self.label_column])


class HFImageStream(IterableDataset):
    """Streams (transform(RGB image), label) from a ``datasets.IterableDataset``.

    Sharding: ``split_dataset_by_node`` gives each rank its shards (or every ``world``-th example when the
    shard count is not a multiple of the world size); inside a rank, ``datasets`` deals the shards to the
    DataLoader workers. Shuffling is a shard shuffle plus a ``shuffle_buffer`` example buffer, reseeded every
    epoch. ``length`` (examples per rank, if known) sizes the epoch for the lr schedule.
    """

    def __init__(self, ds: datasets.IterableDataset, image_column: str, label_column: str,
                 transform: Callable | None, split: str, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 0, seed: int = 0, skip_corrupt: bool = False,
                 length: int | None = None, start_epoch: int = 0) -> None:
        ds = _undecoded(ds, image_column)
        if shuffle_buffer > 0:
            ds = ds.shuffle(seed=seed, buffer_size=shuffle_buffer)  # same seed on every rank: same shard order
        self.ds = split_dataset_by_node(ds, rank=rank, world_size=world_size) if world_size > 1 else ds
        self.image_column, self.label_column, self.transform, self.split = image_column, label_column, transform, split
        self.skip_corrupt = skip_corrupt
        self.length = length
        self.epoch = start_epoch  # counted per pass: persistent workers keep their copy across epochs
        self.skipped = 0

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("stream length unknown")
        return self.length

    def __iter__(self):
        self.ds.set_epoch(self.epoch)
        self.epoch += 1
        for position, row in enumerate(self.ds):
            try:
                image = decode_image(row[self.image_column], f"{self.split} stream example {position}")
            except CorruptImageError as exc:
                if not self.skip_corrupt:
                    raise
                self.skipped += 1
                log.warning("skipped corrupt image %s (%d so far in this worker)", getattr(exc, "source", exc),
                            self.skipped)
                continue
            yield (self.transform(image) if self.transform else image), int(row[self.label_column])


def _is_saved_dataset(path: str | None) -> bool:
    return bool(path) and Path(path).expanduser().is_dir() and any(
        (Path(path).expanduser() / name).is_file() for name in ("dataset_dict.json", "state.json"))


class HFDataModule(AugmentedDataModule):
    """A HuggingFace dataset with an image column and an integer label column.

    Args:
        path: a ``save_to_disk`` folder (read with ``load_from_disk``), or the first argument of
            ``load_dataset``: a builder (``parquet``, ``arrow``, ``imagefolder``, ...), a local script/folder
            or, online, a hub name.
        name, data_files, data_dir, cache_dir: passed to ``load_dataset`` (e.g. ``data_files={train: a/*.parquet, ...}``).
        train_split, val_split, test_split: split names; ``test_split`` null = test on ``val_split``.
        image_column, label_column: column names (e.g. ``img`` / ``fine_label`` for CIFAR-100 on the hub).
        num_classes: needed only when the label column is not a ``ClassLabel`` (names then come from it).
        streaming: stream the splits (data that does not fit locally); map-style otherwise.
        train_samples: examples in the train split when streaming and the dataset does not say (sizes epochs).
        shuffle_buffer: example buffer of the streamed train shuffle.
    """

    reads_files = True

    def __init__(
        self,
        path: str | None = None,
        name: str | None = None,
        data_files: Any = None,
        data_dir: str | None = None,
        cache_dir: str | None = None,
        train_split: str = "train",
        val_split: str = "validation",
        test_split: str | None = None,
        image_column: str = "image",
        label_column: str = "label",
        num_classes: int | None = None,
        streaming: bool = False,
        train_samples: int | None = None,
        shuffle_buffer: int = 10_000,
        **options,
    ) -> None:
        super().__init__(**options)
        if not path:
            raise ConfigError("data.path is not set: a save_to_disk folder, or a load_dataset builder such as "
                              "data.path=parquet data.data_files='{train: ..., validation: ...}'")
        self.path, self.name, self.data_dir, self.cache_dir = path, name, data_dir, cache_dir
        self.data_files = _plain(data_files)
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split}
        self.image_column, self.label_column = image_column, label_column
        self.streaming, self.train_samples, self.shuffle_buffer = streaming, train_samples, shuffle_buffer
        self._raw = {stage: self._load(split) for stage, split in self.splits.items()}
        features = self._raw["train"].features
        if features is not None:
            for column in (image_column, label_column):
                if column not in features:
                    raise ConfigError(f"the dataset has no column {column!r} (columns: {', '.join(features)}): "
                                      f"set data.image_column / data.label_column")
        label = features.get(label_column) if features is not None else None
        if isinstance(label, datasets.ClassLabel):
            self.classes = list(label.names)
            if num_classes is not None and num_classes != len(self.classes):
                raise ConfigError(f"data.num_classes={num_classes} but column {label_column!r} has "
                                  f"{len(self.classes)} classes: drop data.num_classes")
        elif num_classes is not None:
            self.classes = [str(i) for i in range(num_classes)]
        elif not streaming:
            self.classes = [str(i) for i in range(int(max(self._raw["train"][label_column])) + 1)]
        else:
            raise ConfigError(f"column {label_column!r} is not a ClassLabel, so the class count is unknown "
                              "when streaming: set data.num_classes")
        self.num_classes = len(self.classes)
        if streaming and self.train_fraction < 1.0:
            raise ConfigError(f"data.train_fraction={self.train_fraction} needs the whole label column, which a "
                              "stream does not have: set data.streaming=false or data.train_fraction=1.0")

    def _load(self, split: str):
        try:
            if _is_saved_dataset(self.path):
                saved = datasets.load_from_disk(str(Path(self.path).expanduser()))
                if not isinstance(saved, datasets.DatasetDict):
                    raise ConfigError(f"data.path={self.path} holds a single split, not a DatasetDict: save "
                                      "DatasetDict({'train': ..., 'validation': ...}) or use load_dataset files")
                ds = saved[split]
                return ds.to_iterable_dataset(num_shards=max(1, min(64, len(ds)))) if self.streaming else ds
            return datasets.load_dataset(self.path, self.name, data_files=self.data_files, data_dir=self.data_dir,
                                         cache_dir=self.cache_dir, split=split, streaming=self.streaming)
        except ConfigError:
            raise
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"data.path={self.path}: cannot load split {split!r} ({exc}); set "
                              "data.train_split / data.val_split / data.test_split to existing splits") from exc
        except FileNotFoundError as exc:
            raise ConfigError(f"data.path={self.path}: {exc}") from exc

    @staticmethod
    def _stream_length(ds, split: str, world: int, known: int | None = None) -> int | None:
        info = getattr(ds, "info", None)
        if known is None and info is not None and info.splits and split in info.splits:
            known = info.splits[split].num_examples or None
        return None if known is None else math.ceil(known / world)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        transforms = {"train": self.train_transform(), "val": self.eval_transform(), "test": self.eval_transform()}
        if not self.streaming:
            for stage_name, raw in self._raw.items():
                data = HFImageDataset(raw, self.image_column, self.label_column, transforms[stage_name],
                                      self.splits[stage_name], encoded=stage_name == "train" and
                                      self.encoded_train_images)
                if stage_name == "train":
                    data = self.train_subset(data, lambda: raw[self.label_column])
                data = self.tolerate_corrupt(data)
                setattr(self, f"{stage_name}_set", data)
            return
        world, rank = self._world()
        start_epoch = self.trainer.current_epoch if self.trainer is not None else 0
        for stage_name, raw in self._raw.items():
            train = stage_name == "train"
            split = self.splits[stage_name]
            # every rank evaluates the whole eval stream: same synced metrics, and no rank runs out early
            stream = HFImageStream(raw, self.image_column, self.label_column, transforms[stage_name], split,
                                   rank=rank if train else 0, world_size=world if train else 1,
                                   shuffle_buffer=self.shuffle_buffer if train else 0, seed=self.seed,
                                   skip_corrupt=self.skip_corrupt,
                                   length=self._stream_length(raw, split, world if train else 1,
                                                              self.train_samples if train else None),
                                   start_epoch=start_epoch if train else 0)
            setattr(self, f"{stage_name}_set", stream)
        if self.train_set.length is None:
            raise ConfigError("streaming: the train split does not state its size; set data.train_samples "
                              "(number of training examples) so epochs and the lr schedule have a length")

    def train_dataloader(self) -> DataLoader:
        return self._stream_loader(self.train_set, True) if self.streaming else super().train_dataloader()

    def _stream_loader(self, dataset: IterableDataset, train: bool) -> DataLoader:
        # a corrupt image stops every rank (deit_train.stops)
        return StoppingLoader(dataset, batch_size=self.batch_size, drop_last=train, **self.loader_options())

    def val_dataloader(self) -> DataLoader:
        return self._stream_loader(self.val_set, False) if self.streaming else super().val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._stream_loader(self.test_set, False) if self.streaming else super().test_dataloader()


def _plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (``load_dataset`` checks types)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
