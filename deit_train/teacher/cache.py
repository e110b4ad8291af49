"""Exact write-through cache of the teacher's logits (``teacher.cache_dir``).

On the deterministic data stream (:mod:`deit_train.data.stream`) the images of training batch ``b`` of epoch
``e`` on rank ``r`` depend only on the data recipe, the seed, the per-device batch, the world size and the
accumulation -- not on the student. So a sweep of students against one teacher can compute the teacher once:

- ``<cache_dir>/<fingerprint>/`` holds the outputs of one (data, recipe, seed, batch, world, teacher) setting;
  another setting gets another sub-directory, never a mix. ``fingerprint.json`` says what was hashed.
- Per (epoch, rank) a shard: the top-k logits ``values.npy`` (k x fp16, or fp32) and their class ``indices.npy``
  for every step, written to temporary memory-mapped files during the epoch and renamed into place with a
  manifest (``.json``, sha256 of both files) once the epoch is complete. The manifest is the commit: a run
  stopped mid-epoch leaves no shard, a shard whose checksum fails is recomputed.
- A run whose shard exists reads it (memory-mapped) instead of running the teacher, except on the drift-guard
  steps (the first read step, then every ``verify_every``), where it also runs the teacher and stops with one
  line if the two disagree.

The teacher term is computed from the stored top-k in both runs: the writing run trains on exactly what it
stores, so writing and reading runs are bit-identical. Dense logits are rebuilt with the non-top-k classes at
the k-th value - 1e4 (finite: KL with log targets turns 0 x inf into NaN), i.e. the soft target is the
renormalised top-k distribution -- exact when k = number of classes; the hard target (argmax) is exact with
k = 1 or fp32 values.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from deit_train.data.device_augment import device_identity
from deit_train.errors import ConfigError
from deit_train.stops import defer_stop

log = logging.getLogger(__name__)

# options of the teacher group that configure this cache, not the teacher model
CACHE_OPTIONS = ("cache_dir", "cache_topk", "cache_dtype", "cache_verify_every")
# data options that change how fast images load, not which images a step sees
# (uint8_workers: the uint8 path is bit-identical to the CPU path on every device: no division runs on the device)
# fingerprint keys that only say which seed drew the augmentations (flattened names)
_SEED_KEYS = frozenset({"seed", "data.seed"})
_LOADER_OPTIONS = ("num_workers", "pin_memory", "recipe", "skip_corrupt", "cache_dir", "uint8_workers")
_DTYPES = {"float16": np.float16, "float32": np.float32}
# gap below the k-th logit for the classes outside the top-k (finite, and exp(-gap) == 0 in fp32)
_FILL_GAP = 1e4
FORMAT_VERSION = 1


def build_teacher(config: DictConfig | None) -> nn.Module | None:
    """The teacher group's model (``module.teacher``), without the cache options (they are the cache's)."""
    if config is None:
        return None
    from hydra.utils import instantiate

    options = _without_cache_options(OmegaConf.to_container(config, resolve=True))
    if "members" in options:  # an ensemble: the members' own cache options are not theirs either
        options["members"] = {name: _without_cache_options(member) for name, member in options["members"].items()}
    return instantiate(options)


def _without_cache_options(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in CACHE_OPTIONS}


def dense_logits(values: Tensor, indices: Tensor, num_classes: int) -> Tensor:
    """(B, num_classes) float32 logits from the top-k ``values`` (descending) and their class ``indices``."""
    values = values.float()
    if values.shape[1] == num_classes:
        return torch.empty(values.shape[0], num_classes, device=values.device).scatter_(1, indices.long(), values)
    fill = (values[:, -1:] - _FILL_GAP).expand(-1, num_classes).contiguous()
    return fill.scatter_(1, indices.long(), values)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def source_identity(datamodule) -> str:
    """What the training images are, beyond the config: a hash of the file list (folders), of the arrays (digits,
    CIFAR), the HF dataset fingerprint or a pack's content digest; the config alone for synthetic data."""
    if getattr(datamodule, "content_digest", None):  # a pack: its images and labels, wherever it lies
        return datamodule.content_digest
    dataset = datamodule.train_set
    while hasattr(dataset, "dataset") and not hasattr(dataset, "samples"):  # wrappers (SkipCorrupt)
        dataset = dataset.dataset
    digest = hashlib.sha256()
    if hasattr(dataset, "samples"):  # torchvision ImageFolder: (path, label) pairs
        for path, label in dataset.samples:
            digest.update(f"{path}\t{label}\n".encode())
    elif hasattr(dataset, "ds") and hasattr(dataset.ds, "_fingerprint"):  # HF map-style dataset
        digest.update(str(dataset.ds._fingerprint).encode())
    elif hasattr(dataset, "images") and hasattr(dataset, "labels"):  # in-memory arrays
        for array in (dataset.images, dataset.labels):
            digest.update(np.ascontiguousarray(np.asarray(array)).tobytes())
    else:
        return type(dataset).__name__
    return digest.hexdigest()


def _run_device(datamodule, teacher: nn.Module) -> torch.device:
    """Where the batches are finished: the trainer's device, or (teacher-only pass) the teacher's."""
    strategy = getattr(getattr(datamodule, "trainer", None), "strategy", None)
    if strategy is not None:
        return strategy.root_device
    return next(teacher.parameters()).device


def run_fingerprint(cfg: DictConfig, datamodule, teacher: nn.Module, world_size: int, topk: int,
                    dtype: str) -> dict:
    """Everything that decides the teacher's output at (epoch, rank, batch) -- and nothing about the student."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in _LOADER_OPTIONS}
    if getattr(datamodule, "content_digest", None):  # the digest says what the images are; a moved pack is the same
        data.pop("root", None)
    augment = OmegaConf.to_container(cfg.augment, resolve=True) if cfg.get("augment") is not None else None
    device_augment = bool(augment.pop("device", False)) if augment is not None else False
    # popped whatever its value, so CPU-path fingerprints stay what they were before the option existed
    device_decode = bool(augment.pop("device_decode", False)) if augment is not None else False
    extra = ({"device_augment": device_identity(_run_device(datamodule, teacher), decode=device_decode)}
             if device_augment else {})
    return {
        **extra,
        "format": FORMAT_VERSION,
        "data": data,
        "source": source_identity(datamodule),
        "augment": augment,
        "seed": int(cfg.seed),
        "per_device_batch": int(cfg.data.batch_size),
        "world_size": int(world_size),
        "accumulate_grad_batches": int(cfg.trainer.get("accumulate_grad_batches") or 1),
        "precision": str(cfg.trainer.get("precision")),
        "teacher": teacher.fingerprint(),
        "topk": int(topk),
        "dtype": dtype,
    }


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


class CacheEntry:
    """``<cache_dir>/<digest>/``: the shards of one fingerprint."""

    def __init__(self, cache_dir: str | Path, fingerprint: dict) -> None:
        self.root = Path(cache_dir).expanduser()
        self.fingerprint = fingerprint
        self.digest = fingerprint_digest(fingerprint)
        self.path = self.root / self.digest

    def open(self, report: bool = True) -> None:
        """Create the entry (with its ``fingerprint.json``); ``report``: say in one line why other entries do not
        fit (once per run: rank 0)."""
        if not (self.path / "fingerprint.json").is_file():
            if report:
                self._report_others()
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"teacher.cache_dir={self.root} cannot be created ({exc.strerror}): "
                                  "point it at a writable folder") from exc
            tmp = self.path / f".fingerprint.{uuid.uuid4().hex}.tmp"
            tmp.write_text(json.dumps(self.fingerprint, indent=2, sort_keys=True, default=str))
            tmp.replace(self.path / "fingerprint.json")

    def _report_others(self) -> None:
        mine = _flatten(json.loads(json.dumps(self.fingerprint, default=str)))
        nearest = None
        for other in sorted(self.root.glob("*/fingerprint.json")):
            try:
                theirs = _flatten(json.loads(other.read_text()))
            except (OSError, ValueError):
                continue
            differing = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            if nearest is None or len(differing) < len(nearest[1]):
                nearest = (other.parent.name, differing)
        if nearest is not None:
            shown = ", ".join(nearest[1][:6]) + (", ..." if len(nearest[1]) > 6 else "")
            # another seed draws other augmentations: a seed sweep's expected miss, nothing for the user to change
            level = logging.INFO if set(nearest[1]) <= _SEED_KEYS else logging.WARNING
            log.log(level, "teacher cache %s: no entry for this run (%s); the nearest, %s, differs in %s: "
                    "not used, computing the teacher live into a new entry", self.root, self.digest, nearest[0], shown)

    def shard(self, epoch: int, rank: int) -> Path:
        """Stem of the shard files of (epoch, rank)."""
        return self.path / f"epoch{epoch:04d}-rank{rank:03d}"


class ShardWriter:
    """One epoch of one rank, filled step by step into temporary memory-mapped files, committed atomically."""

    def __init__(self, stem: Path, steps: int, batch: int, topk: int, dtype: str, num_classes: int) -> None:
        self.stem, self.steps = stem, steps
        token = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self.tmp = {part: stem.with_name(f".{stem.name}.{part}.{token}.tmp") for part in ("values", "indices")}
        index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
        self.values = np.lib.format.open_memmap(self.tmp["values"], mode="w+", dtype=_DTYPES[dtype],
                                                shape=(steps, batch, topk))
        self.indices = np.lib.format.open_memmap(self.tmp["indices"], mode="w+", dtype=index_dtype,
                                                 shape=(steps, batch, topk))
        self.filled = np.zeros(steps, dtype=bool)

    def put(self, step: int, values: np.ndarray, indices: np.ndarray) -> None:
        self.values[step], self.indices[step] = values, indices
        self.filled[step] = True

    @property
    def complete(self) -> bool:
        return bool(self.filled.all())

    def commit(self) -> None:
        """Flush, checksum and rename into place; the manifest last (a shard without it does not exist)."""
        for array in (self.values, self.indices):
            array.flush()
        del self.values, self.indices
        manifest = {"steps": self.steps}
        for part, tmp in self.tmp.items():
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            manifest[f"{part}_sha256"] = _sha256(tmp)
            tmp.replace(f"{self.stem}.{part}.npy")
        manifest_tmp = self.stem.with_name(f".{self.stem.name}.json.{uuid.uuid4().hex[:8]}.tmp")
        manifest_tmp.write_text(json.dumps(manifest, indent=2))
        manifest_tmp.replace(f"{self.stem}.json")

    def discard(self) -> None:
        self.values = self.indices = None
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


def read_shard(stem: Path, steps: int, batch: int, topk: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The memory-mapped (values, indices) of a committed shard covering ``steps`` steps, or None when it is
    missing, shorter, of another shape, or fails its checksum (logged: it is recomputed)."""
    manifest_path = Path(f"{stem}.json")
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {part: Path(f"{stem}.{part}.npy") for part in ("values", "indices")}
        bad = [part for part, path in files.items() if _sha256(path) != manifest[f"{part}_sha256"]]
        if bad:
            log.warning("teacher cache shard %s: %s checksum mismatch (corrupted or truncated): recomputing it",
                        stem, " and ".join(bad))
            return None
        values = np.load(files["values"], mmap_mode="r")
        indices = np.load(files["indices"], mmap_mode="r")
    except (OSError, ValueError, KeyError) as exc:
        log.warning("teacher cache shard %s unreadable (%s): recomputing it", stem, exc)
        return None
    if values.shape[0] < steps or values.shape[1:] != (batch, topk) or indices.shape != values.shape:
        return None  # written by a run with fewer steps per epoch (trainer.limit_train_batches): recomputed
    return values, indices


class TeacherLogitCache(Callback):
    """The write-through cache of one run: a callback that opens the epoch's shard, and the callable that
    ``ClassificationModule`` uses in place of its teacher during training.

    Args:
        cache_dir: root folder of the cache (``teacher.cache_dir``).
        run_config: the run's config (the fingerprint reads data, augment, seed, trainer from it).
        topk: logits stored per image (``teacher.cache_topk``).
        dtype: ``float16`` or ``float32`` storage of the values (``teacher.cache_dtype``).
        verify_every: drift guard period in read steps (``teacher.cache_verify_every``); the first read step of a
            run is always verified; 0 = only that one.
    """

    def __init__(self, cache_dir: str, run_config: DictConfig, topk: int = 10, dtype: str = "float16",
                 verify_every: int = 500) -> None:
        if topk < 1:
            raise ConfigError(f"teacher.cache_topk={topk}: store at least 1 logit per image (1 suffices for hard "
                              "distillation)")
        if dtype not in _DTYPES:
            raise ConfigError(f"teacher.cache_dtype={dtype!r}: use float16 or float32")
        if verify_every < 0:
            raise ConfigError(f"teacher.cache_verify_every={verify_every}: use 0 (first read step only) or more")
        if run_config.data.get("streaming"):
            raise ConfigError("teacher.cache_dir needs the deterministic map-style stream: set data.streaming=false "
                              "or teacher.cache_dir=null")
        self.cache_dir, self.run_config = cache_dir, run_config
        self.topk, self.dtype, self.verify_every = topk, dtype, verify_every
        self.entry: CacheEntry | None = None
        self.teacher: nn.Module | None = None
        self.num_classes = 0
        self._reader: tuple[np.ndarray, np.ndarray] | None = None
        self._writer: ShardWriter | None = None
        self._epoch = self._step = self._rank = 0
        self._epoch_started = False
        self._read_steps = 0
        self._trainer: L.Trainer | None = None  # None in the teacher-only pass
        self.stats = {"read": 0, "written": 0, "live": 0, "verified": 0}

    @classmethod
    def from_run_config(cls, cfg: DictConfig) -> "TeacherLogitCache | None":
        """The cache ``cfg.teacher.cache_dir`` asks for, or None (no cache, or no teacher in this run)."""
        teacher = cfg.get("teacher")
        uses_teacher = cfg.get("distill") is not None and cfg.distill.get("distill_type", "none") != "none"
        if teacher is None or not teacher.get("cache_dir") or not uses_teacher:
            return None
        return cls(teacher.cache_dir, cfg, topk=int(teacher.get("cache_topk", 10)),
                   dtype=str(teacher.get("cache_dtype", "float16")),
                   verify_every=int(teacher.get("cache_verify_every", 500)))

    # ---- lifecycle ----------------------------------------------------------------------------------
    def attach(self, teacher: nn.Module, datamodule, world_size: int, report: bool = True) -> None:
        """Bind to the run's teacher and (set up) data, open the fingerprint's entry (``report``: on rank 0)."""
        self.teacher = teacher
        self.num_classes = teacher.num_classes
        if self.topk > self.num_classes:
            raise ConfigError(f"teacher.cache_topk={self.topk} exceeds the teacher's {self.num_classes} classes: "
                              f"use at most {self.num_classes}")
        fingerprint = run_fingerprint(self.run_config, datamodule, teacher, world_size, self.topk, self.dtype)
        self.entry = CacheEntry(self.cache_dir, fingerprint)
        self.entry.open(report)

    def start_epoch(self, epoch: int, rank: int, steps: int, batch: int) -> bool:
        """Open (epoch, rank): True when it is read from a committed shard, False when it is computed and written."""
        self.finish_epoch(commit=False)
        self._epoch, self._rank, self._epoch_started = epoch, rank, False
        stem = self.entry.shard(epoch, self._rank)
        self._reader = read_shard(stem, steps, batch, self.topk)
        if self._reader is None:
            self._writer = ShardWriter(stem, steps, batch, self.topk, self.dtype, self.num_classes)
        return self._reader is not None

    def finish_epoch(self, commit: bool = True) -> bool:
        """Commit the epoch's shard when every step was written; True when a shard was committed."""
        writer, self._writer, self._reader = self._writer, None, None
        if writer is None:
            return False
        if commit and writer.complete:
            writer.commit()
            self.stats["written"] += 1
            return True
        writer.discard()  # started mid-epoch (resumed from a mid-epoch checkpoint) or interrupted
        return False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_serves(pl_module.criterion, pl_module.teacher.num_classes)
            pl_module.teacher_cache = self

    def check_serves(self, method: nn.Module, num_classes: int) -> None:
        """Stop with one line, before training, when the method reads more than this cache stores: the teacher's
        pooled features (never stored), or every class's logit (``all_logits``) from a top-k with k < classes."""
        needs, name = method.teacher_needs, method.distill_type
        if "features" in needs:
            raise ConfigError(f"distill={name} reads the teacher's pooled features, which teacher.cache_dir does not "
                              "store (top-k logits only): set teacher.cache_dir=null (the teacher runs live)")
        if "all_logits" in needs and self.topk < num_classes:
            raise ConfigError(f"distill={name} needs every class's teacher logit but teacher.cache_topk={self.topk} "
                              f"keeps {self.topk} of {num_classes}: set teacher.cache_topk={num_classes} (see "
                              "docs/distillation.md for the bytes it takes) or teacher.cache_dir=null")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer = trainer
        self.attach(pl_module.teacher, trainer.datamodule, trainer.world_size, report=trainer.is_global_zero)
        if trainer.is_global_zero:  # one entry for all ranks: said once
            log.info("teacher cache %s (k=%d %s)", self.entry.path, self.topk, self.dtype)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start_epoch(trainer.current_epoch, trainer.global_rank, int(trainer.num_training_batches),
                         trainer.datamodule.batch_size)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self.at_step(batch_idx)

    def at_step(self, batch_idx: int) -> None:
        """The training batch of the epoch that the next call serves."""
        if not self._epoch_started and batch_idx != 0 and (self._reader is not None or self._writer is not None):
            # restarted mid-epoch (a requeue's hpc_ckpt): an epoch's shard is written and committed whole, and the
            # killed attempt's part of it never was; the teacher runs live until the epoch ends
            log.info("teacher cache: epoch %d resumed at batch %d, the teacher runs live for the rest of it",
                     self._epoch, batch_idx)
            self.finish_epoch(commit=False)
        self._epoch_started, self._step = True, batch_idx

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.finish_epoch()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.finish_epoch(commit=False)

    # ---- the teacher's logits for this step --------------------------------------------------------
    def store(self, logits: Tensor) -> Tensor:
        """Write the top-k of live ``logits`` for the current step; returns the logits rebuilt from what was stored."""
        values, indices = torch.topk(logits.detach().float(), self.topk, dim=-1)
        stored_values = values.cpu().numpy().astype(_DTYPES[self.dtype])
        stored_indices = indices.cpu().numpy().astype(self._writer.indices.dtype)
        self._writer.put(self._step, stored_values, stored_indices)
        self.stats["live"] += 1
        return dense_logits(torch.from_numpy(stored_values).to(logits.device),
                            torch.from_numpy(stored_indices.astype(np.int64)).to(logits.device), self.num_classes)

    def __call__(self, images: Tensor) -> Tensor:
        if self._reader is None and self._writer is None:
            return self.teacher(images)
        if self._reader is None:
            return self.store(self.teacher(images))
        values, indices = (torch.from_numpy(np.array(a[self._step])) for a in self._reader)
        logits = dense_logits(values.to(images.device), indices.to(images.device, torch.long), self.num_classes)
        self.stats["read"] += 1
        if self._read_steps == 0 or (self.verify_every and self._read_steps % self.verify_every == 0):
            live = self.teacher(images)
            if not self.verify(live, values.to(images.device), indices.to(images.device, torch.long)):
                logits = live.detach().float()  # this step learns from the teacher; the run stops before the next
        self._read_steps += 1
        return logits

    def verify(self, live: Tensor, values: Tensor, indices: Tensor) -> bool:
        """Whether the live teacher's logits at the cached top-k classes match the cache (and its argmax's logit
        equals the cached top-1's). If not, the run stops with one line, on every rank at its next decision
        (:mod:`deit_train.stops`; at once in the teacher-only pass): a non-deterministic pipeline must not feed wrong
        targets."""
        live = live.detach().float()
        at_cached = live.gather(1, indices)
        tolerance = 1e-2 * (1 + values.float().abs())
        same_values = bool(((at_cached - values.float()).abs() <= tolerance).all())
        same_argmax = bool((live.max(dim=1).values - at_cached[:, 0] <= tolerance[:, 0]).all())
        self.stats["verified"] += 1
        if not (same_values and same_argmax):
            defer_stop(self._trainer, ConfigError(
                f"teacher cache {self.entry.path} disagrees with the live teacher at epoch {self._epoch} step "
                f"{self._step} (rank {self._rank}): the data stream or the teacher is not deterministic; delete that "
                "entry or set teacher.cache_dir=null"))
        return same_values and same_argmax
