"""Checkpoint (and run record) writes that never leave a half-written file where a good one was."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from deit_train.errors import ConfigError


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """``write`` into a temporary file beside ``path``, fsync, then rename over ``path``.

    A crash or full disk mid-write leaves the previous file (or none) intact, and a reader never sees a partial
    file (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """A text file (UTF-8) through :func:`atomic_write`."""
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with :func:`atomic_torch_save` for every write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, path)


def load_checkpoint_file(option: str, path: str | os.PathLike):
    """The object stored in ``path`` (memory-mapped, so cheap for large files), or one line naming ``option``:
    missing, unreadable, truncated, not a checkpoint."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{option}={path} does not exist: check the path")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{option}={path} is not a readable file: check the path and its permissions")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return {key: None for key in handle.keys()}
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except RuntimeError as exc:  # a file in torch's legacy (pre-1.6) format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch/safetensors raise many types for a truncated or foreign file
        raise ConfigError(f"{option}={path} cannot be read as a checkpoint ({type(exc).__name__}; truncated or not a "
                          "torch/safetensors file): pass a .pth/.ckpt/.safetensors file of weights") from exc
