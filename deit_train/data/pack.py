"""Writing packs (``python -m deit_train.pack``): the encoded images of a source's splits, with their labels and
class names, in litdata shards that :class:`deit_train.data.shards.ShardsDataModule` reads back by index.

- Images whose longer side is within ``max_side`` keep their original bytes (byte-identical round trip); larger
  ones are decoded (JPEG DCT-domain reduction first, then Lanczos to exactly ``max_side``) and re-encoded as JPEG
  at ``quality``. A file that does not decode is stored as it is: training meets it as it would meet the file
  (``data.skip_corrupt``).
- Resumable: each split is written by ``litdata.optimize`` with checkpoints, a finished split is not written again,
  and ``pack.json`` (the commit) is written last. ``.pack-source.json`` records what is being packed, so a folder
  holding (part of) another pack is refused rather than mixed.
- The content digest (``pack.json`` ``digest``) hashes every stored image and label in order, read back from the
  written shards: it is the teacher-logit cache's source identity, the same wherever the pack is copied.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sys
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from deit_train.data.images import _DECODE_ERRORS, to_rgb
from deit_train.data.shards import PACK_FILE, PACK_FORMAT, check_shards
from deit_train.errors import ConfigError

SOURCE_FILE = ".pack-source.json"
# stored kinds of image: the file's own bytes, a re-encoded resize, or bytes that did not decode
ORIGINAL, RESIZED, UNREADABLE = "original", "resized", "unreadable"


class FolderSplit:
    """One split of an ImageNet-layout folder: ``(path, label)`` pairs in ImageFolder's order."""

    def __init__(self, root: Path, samples: Sequence[tuple[str, int]]) -> None:
        self.root, self.samples = root, list(samples)
        self.labels = [int(label) for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, index: int) -> str:
        return str(Path(self.samples[index][0]).relative_to(self.root))

    def encoded(self, index: int) -> tuple[bytes, str]:
        return Path(self.samples[index][0]).read_bytes(), self.name(index)

    def listing(self) -> str:
        digest = hashlib.sha256()
        for path, label in self.samples:
            digest.update(f"{Path(path).relative_to(self.root)}\t{label}\n".encode())
        return digest.hexdigest()


class HFSplit:
    """One split of a map-style HuggingFace dataset with its image column undecoded (bytes and/or path)."""

    def __init__(self, ds, image_column: str, label_column: str, split: str) -> None:
        from deit_train.data.hf import _undecoded

        self.ds, self.image_column, self.split = _undecoded(ds, image_column), image_column, split
        self.labels = [int(label) for label in ds[label_column]]

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        return f"{self.split}[{index}]"

    def encoded(self, index: int) -> tuple[bytes, str]:
        cell = self.ds[int(index)][self.image_column]
        name = self.name(index)
        if isinstance(cell, dict):
            if cell.get("bytes") is not None:
                return bytes(cell["bytes"]), cell.get("path") or name
            if cell.get("path"):
                return Path(cell["path"]).read_bytes(), cell["path"]
        raise ConfigError(f"{name}: the image column holds {type(cell).__name__}, not encoded images: only "
                          "image files or bytes can be packed")

    def listing(self) -> str:
        return str(self.ds._fingerprint)


class PackSource:
    """What a pack is made of: class names, splits (name -> FolderSplit/HFSplit) and a description that says
    which data they are (recorded in the pack and compared when a pack is resumed)."""

    def __init__(self, description: dict, classes: Sequence[str], splits: dict[str, Any]) -> None:
        self.description, self.classes, self.splits = description, [str(c) for c in classes], splits

    @classmethod
    def folder(cls, root: str | Path, splits: Sequence[str] = ("train", "val")) -> "PackSource":
        from torchvision.datasets import ImageFolder

        from deit_train.data.imagefolder import class_folders

        root = Path(root).expanduser().resolve()
        for split in splits:
            if not (root / split).is_dir():
                raise ConfigError(f"data.root={root} has no {split}/ folder: expected root/<split>/<class>/<image>")
        classes = class_folders(root / splits[0])
        parts = {}
        for split in splits:
            folder = ImageFolder(str(root / split), loader=lambda path: path)  # listing only, nothing decoded
            if folder.classes != classes:
                raise ConfigError(f"{root / split} class folders differ from {root / splits[0]}'s: both splits "
                                  "need the same class folder names")
            parts[split] = FolderSplit(root, folder.samples)
        return cls({"kind": "imagefolder", "root": str(root)}, classes, parts)

    @classmethod
    def of(cls, datamodule) -> "PackSource":
        """The source behind a data module of ``data=imagefolder`` or ``data=hf`` (map-style)."""
        from deit_train.data.hf import HFDataModule
        from deit_train.data.imagefolder import ImageFolderDataModule

        if isinstance(datamodule, ImageFolderDataModule):
            return cls.folder(datamodule.root, (datamodule.train_split, datamodule.val_split))
        if isinstance(datamodule, HFDataModule):
            if datamodule.streaming:
                raise ConfigError("data.streaming=true cannot be packed: pack the map-style dataset "
                                  "(data.streaming=false)")
            stages = ["train", "val"] + (["test"] if datamodule.splits["test"] != datamodule.splits["val"] else [])
            parts = {stage: HFSplit(datamodule._raw[stage], datamodule.image_column, datamodule.label_column,
                                    datamodule.splits[stage]) for stage in stages}
            description = {"kind": "hf", "path": str(datamodule.path), "name": datamodule.name,
                           "splits": {stage: datamodule.splits[stage] for stage in stages}}
            return cls(description, datamodule.classes, parts)
        raise ConfigError(f"{type(datamodule).__name__} cannot be packed: pack data=imagefolder (data.root=...) or "
                          "data=hf (data.path=...)")

    def identity(self, max_side: int, quality: int) -> dict:
        """What the pack will hold: a folder with another identity is another pack."""
        return {"format": PACK_FORMAT, "source": self.description, "classes": self.classes,
                "max_side": int(max_side), "quality": int(quality),
                "splits": {name: {"count": len(part), "listing": part.listing()} for name, part in self.splits.items()}}


def fit_image(data: bytes, max_side: int, quality: int) -> tuple[bytes, str]:
    """``data`` itself when its longer side is within ``max_side`` (or it does not decode); else the image
    resized to a longer side of ``max_side`` and re-encoded as JPEG at ``quality``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if max(width, height) <= max_side:
                return data, ORIGINAL
            scale = max_side / max(width, height)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            image.draft("RGB", size)  # JPEG: decode at the smallest DCT scale still >= size (2-8x less work)
            resized = to_rgb(image).resize(size, Image.Resampling.LANCZOS)
    except _DECODE_ERRORS:
        return data, UNREADABLE
    out = io.BytesIO()
    resized.save(out, format="JPEG", quality=quality)
    return out.getvalue(), RESIZED


class PackItem:
    """``litdata.optimize``'s function: item ``index`` of one split, as stored. Runs in optimize's workers
    (forked: ``counter``, the progress bar's shared count, is inherited)."""

    def __init__(self, part, max_side: int, quality: int, counter) -> None:
        self.part, self.max_side, self.quality, self.counter = part, max_side, quality, counter

    def __call__(self, index: int) -> dict:
        from litdata.types import File

        try:
            data, name = self.part.encoded(index)
            stored, kind = fit_image(data, self.max_side, self.quality)
        except OSError:  # unreadable source file (vanished, no permission): counted, and met at training as corrupt
            stored, kind, name = b"", UNREADABLE, self.part.name(index)
        with self.counter.get_lock():
            self.counter.value += 1
        # File: litdata stores the bytes behind an offset table (one slice per random read). As a plain ``bytes``
        # leaf it would pick its Arrow layout, which decodes a 256-row batch per random read (~200x slower here).
        return {"index": int(index), "label": int(self.part.labels[index]), "name": name, "kind": kind,
                "image": File(bytes=stored)}


def _write_json(path: Path, content: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(content, indent=1))
    tmp.replace(path)


def _claim(out: Path, identity: dict) -> None:
    """Make ``out`` the folder of this pack, or refuse: another pack's folder, or a folder with other files."""
    marker = out / SOURCE_FILE
    if marker.is_file():
        theirs = json.loads(marker.read_text())
        if theirs != identity:
            differing = sorted(k for k in identity.keys() | theirs.keys() if identity.get(k) != theirs.get(k))
            raise ConfigError(f"out={out} holds a pack of another source or setting (differs in "
                              f"{', '.join(differing)}): choose another out= or delete {out}")
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out={out} is not empty and holds no pack: choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_json(marker, identity)


def _write_split(out: Path, name: str, item: PackItem, workers: int, chunk_bytes: str) -> None:
    from litdata import optimize

    split_dir = out / name
    if (split_dir / "index.json").is_file():
        return  # written completely by an earlier run
    pinned = split_dir / ".workers"  # litdata resumes per worker: a resumed split keeps its first worker count
    split_dir.mkdir(parents=True, exist_ok=True)
    if pinned.is_file():
        workers = int(pinned.read_text())
    else:
        pinned.write_text(str(workers))
    optimize(item, list(range(len(item.part))), output_dir=str(split_dir), chunk_bytes=chunk_bytes,
             num_workers=workers, use_checkpoint=True, keep_data_ordered=True, reorder_files=False,
             start_method="fork", verbose=False)


def _read_back(out: Path, name: str, labels: Sequence[int]) -> dict:
    """The split's digest and counts, from what the shards hold (and a check that item i is source item i)."""
    from litdata import StreamingDataset

    stored = StreamingDataset(str(out / name))
    if len(stored) != len(labels):
        raise ConfigError(f"out={out}: split {name} holds {len(stored)} items, the source {len(labels)}: delete "
                          f"{out / name} and pack again")
    digest, kinds, unreadable = hashlib.sha256(), {ORIGINAL: 0, RESIZED: 0, UNREADABLE: 0}, []
    for index in range(len(stored)):
        item = stored[index]
        if item["index"] != index or item["label"] != labels[index]:
            raise ConfigError(f"out={out}: split {name} item {index} is source item {item['index']}: delete "
                              f"{out / name} and pack again")
        digest.update(f"{item['label']}\t".encode())
        digest.update(hashlib.sha256(item["image"]).digest())
        kinds[item["kind"]] += 1
        if item["kind"] == UNREADABLE and len(unreadable) < 10:
            unreadable.append(item["name"])
    return {"count": len(stored), "labels": list(labels), "sha256": digest.hexdigest(), "kinds": kinds,
            "unreadable_examples": unreadable}


def write_pack(source: PackSource, out: str | Path, max_side: int = 512, quality: int = 90,
               workers: int | None = None, chunk_bytes: str = "256MB", progress: bool = True) -> dict:
    """Pack ``source`` into ``out`` (resuming an interrupted pack of the same source); returns ``pack.json``."""
    from tqdm import tqdm

    if max_side < 1 or not 1 <= quality <= 100:
        raise ConfigError(f"pack.max_side={max_side}, pack.quality={quality}: use max_side >= 1 and quality in 1..100")
    out = Path(out).expanduser()
    identity = source.identity(max_side, quality)
    _claim(out, identity)
    if (out / PACK_FILE).is_file():
        for name in source.splits:
            check_shards(out, name)
        return json.loads((out / PACK_FILE).read_text())
    workers = max(1, workers or len(os.sched_getaffinity(0)))
    todo = {name: part for name, part in source.splits.items() if not (out / name / "index.json").is_file()}
    counter = multiprocessing.get_context("fork").Value("q", 0)
    bar = tqdm(total=sum(len(part) for part in todo.values()), desc=f"pack {out.name}", unit="img",
               disable=not progress, file=sys.stderr)
    done = threading.Event()

    def follow() -> None:  # optimize blocks this thread; its workers count into ``counter``
        while not done.wait(0.5):
            bar.update(counter.value - bar.n)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    try:
        for name, part in todo.items():
            _write_split(out, name, PackItem(part, max_side, quality, counter), min(workers, len(part)), chunk_bytes)
    finally:
        done.set()
        follower.join()
        bar.update(bar.total - bar.n)
        bar.close()
    splits = {name: {**identity["splits"][name], **_read_back(out, name, part.labels)}
              for name, part in source.splits.items()}
    content = hashlib.sha256(json.dumps({"classes": source.classes,
                                         "splits": {n: s["sha256"] for n, s in splits.items()}},
                                        sort_keys=True).encode()).hexdigest()
    meta = {**identity, "splits": splits, "digest": content}
    _write_json(out / PACK_FILE, meta)
    return meta


def pack_folder(root: str | Path, out: str | Path, max_side: int = 512, quality: int = 90,
                workers: int | None = None, progress: bool = False) -> dict:
    """Pack an ImageNet-layout folder (``root/train/<class>/*``, ``root/val/<class>/*``) into ``out``."""
    return write_pack(PackSource.folder(root), out, max_side=max_side, quality=quality, workers=workers,
                      progress=progress)
