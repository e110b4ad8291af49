"""Packed shards (``python -m deit_train.pack``) as a data source: ``data=shards data.root=<pack>``.

A pack is a folder written by :mod:`deit_train.data.pack`::

    <pack>/pack.json         what the pack holds (written last: without it the pack is partial)
    <pack>/<split>/          one litdata dataset per split (index.json + chunk-*.bin), items
                             {"index", "label", "name", "image": the encoded bytes}

Items are read by index (litdata's ``StreamingDataset.__getitem__``) under our own :class:`SeededSampler`, so
repeated augmentation, DDP, ``train_fraction``, ``skip_corrupt`` and the deterministic stream are those of
every other map-style source; the images are decoded by :func:`deit_train.data.images.load_rgb` as from folders.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from torch.utils.data import Dataset

from deit_train.data.augmented import AugmentedDataModule
from deit_train.data.images import EncodedImage, corrupt_image_error, load_rgb
from deit_train.errors import ConfigError

PACK_FILE = "pack.json"
PACK_FORMAT = 1
# what the pack command is, for the messages that tell a user to run it
PACK_COMMAND = "python -m deit_train.pack data=<source> ... out=<pack>"


def read_pack(root: str | Path) -> dict:
    """``<root>/pack.json`` of a complete pack whose shards are all there at their written sizes.

    Raises:
        ConfigError: no pack, a partial pack (interrupted packing), or a missing or truncated shard.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"data.root={root} does not exist: pass a folder written by {PACK_COMMAND}")
    meta_path = root / PACK_FILE
    if not meta_path.is_file():
        if (root / ".pack-source.json").is_file():
            raise ConfigError(f"data.root={root} is a partial pack (its packing did not finish): run the same pack "
                              "command again to complete it")
        raise ConfigError(f"data.root={root} is not a pack (no {PACK_FILE}): write one with {PACK_COMMAND}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"data.root={root}: {PACK_FILE} is unreadable ({exc}): pack again") from exc
    if meta.get("format") != PACK_FORMAT:
        raise ConfigError(f"data.root={root}: pack format {meta.get('format')} is not {PACK_FORMAT}: pack the "
                          "source again with this version")
    for split in meta["splits"]:
        check_shards(root, split)
    return meta


def check_shards(root: Path, split: str) -> None:
    """Every chunk file that ``<root>/<split>/index.json`` lists exists with the size it was written with."""
    index_path = root / split / "index.json"
    if not index_path.is_file():
        raise ConfigError(f"data.root={root}: split {split} has no index.json (damaged pack): pack again")
    for chunk in json.loads(index_path.read_text())["chunks"]:
        path = root / split / chunk["filename"]
        size = path.stat().st_size if path.is_file() else None
        if size != chunk["chunk_bytes"]:
            found = "is missing" if size is None else f"has {size} bytes, not {chunk['chunk_bytes']}"
            raise ConfigError(f"data.root={root}: shard {split}/{chunk['filename']} {found} (truncated, replaced or "
                              f"lost): delete {root} and pack again")


class PackedImages(Dataset):
    """Map-style view of one split of a pack: item ``i`` = (transform(RGB image), label).

    The litdata reader is opened lazily in each process (DataLoader workers, DDP ranks), not pickled.
    """

    def __init__(self, root: str | Path, split: str, labels: Sequence[int], digest: str,
                 transform: Callable | None = None, encoded: bool = False) -> None:
        self.root, self.split = Path(root), split
        self.targets = list(labels)  # read by train_subset (class-balanced train_fraction)
        self.content_digest = digest  # the teacher cache's source identity
        self.transform = transform
        self.encoded = encoded  # the transform decodes (EncodedImage: the device path's reduced-DCT decode)
        self._reader = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_reader": None}

    def read(self, index: int) -> dict:
        """The stored item ``index``: ``{"index", "label", "name", "image"}`` (the encoded bytes)."""
        if self._reader is None:
            from litdata import StreamingDataset

            self._reader = StreamingDataset(str(self.root / self.split))
        return self._reader[int(index)]

    def __getitem__(self, index: int):
        where = f"{self.root}/{self.split}[{index}]"
        try:
            item = self.read(index)
        except Exception as exc:  # litdata met a damaged chunk: one sample's problem, as a corrupt file would be
            raise corrupt_image_error(where, exc) from exc
        image = (EncodedImage if self.encoded else load_rgb)(item["image"], name=f"{where} ({item['name']})")
        return (self.transform(image) if self.transform else image), int(item["label"])


class ShardsDataModule(AugmentedDataModule):
    """A pack written by ``python -m deit_train.pack``: class names, labels and splits come from the pack.

    ``test`` evaluates the pack's ``test`` split when it has one, else ``val`` (as ImageNet folders do).
    """

    reads_files = True

    def __init__(
        self,
        root: str | None = None,
        num_classes: int | None = None,
        **options,
    ) -> None:
        super().__init__(**options)
        if not root:
            raise ConfigError(f"data.root is not set: pass data.root=<pack> (a folder written by {PACK_COMMAND})")
        self.root = Path(root).expanduser()
        self.meta = read_pack(self.root)
        for split in ("train", "val"):
            if split not in self.meta["splits"]:
                raise ConfigError(f"data.root={self.root}: the pack has no {split} split (it has "
                                  f"{', '.join(self.meta['splits'])}): pack a source with train and val splits")
        self.classes = list(self.meta["classes"])
        if num_classes is not None and num_classes != len(self.classes):
            raise ConfigError(f"data.num_classes={num_classes} but the pack {self.root} has {len(self.classes)} "
                              "classes: drop data.num_classes")
        self.num_classes = len(self.classes)

    @property
    def content_digest(self) -> str:
        """Digest of every stored image and label, in order (the pack's identity, wherever it lies)."""
        return self.meta["digest"]

    def split(self, name: str, transform: Callable | None, encoded: bool = False) -> PackedImages:
        info = self.meta["splits"][name]
        return PackedImages(self.root, name, info["labels"], self.content_digest, transform, encoded)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train = self.split("train", self.train_transform(), encoded=self.encoded_train_images)
        self.train_set = self.tolerate_corrupt(self.train_subset(train, lambda: train.targets))
        self.val_set = self.tolerate_corrupt(self.split("val", self.eval_transform()))
        has_test = "test" in self.meta["splits"]
        self.test_set = self.tolerate_corrupt(self.split("test", self.eval_transform())) if has_test else self.val_set
