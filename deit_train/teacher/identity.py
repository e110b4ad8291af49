"""The teacher's identity: what a teacher file says about its network and what its outputs mean.

The identity travels with the file (:func:`teacher_file`): architecture, normalisation, input resolution and
interpolation, class names in label order; plus the hash of the weights (:func:`state_sha256`), which keys the
teacher-logit cache. :class:`~deit_train.teacher.network.FrozenTeacher` uses them whatever the data config says.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor

from deit_train.models.checkpoint import read_state_dict

# Key of the identity in a teacher file written by this framework (a dict next to ``state_dict``).
IDENTITY_KEY = "deit_train_teacher"
# Where a Lightning checkpoint of this project keeps its resolved model/data configs and class names.
_RUN_CONFIG_KEY = "deit_train"


@dataclass
class TeacherIdentity:
    """What a teacher expects of its input and what its outputs mean; ``None`` = unknown."""

    architecture: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    image_size: int | None = None
    interpolation: str | None = None
    class_names: list[str] | None = None


def teacher_file(checkpoint: str | Path) -> dict:
    """A teacher file from a checkpoint of this project: its weights and identity, read back by FrozenTeacher."""
    return {"state_dict": read_state_dict(checkpoint), IDENTITY_KEY: asdict(read_teacher_identity(checkpoint))}


def read_teacher_identity(path: str | Path) -> TeacherIdentity:
    """The identity stored in a teacher file: ours (``IDENTITY_KEY``), a Lightning checkpoint of this project
    (its stored model/data config), or safetensors metadata; empty for plain state dicts and foreign files."""
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {}).get(IDENTITY_KEY)
        return TeacherIdentity(**json.loads(meta)) if meta else TeacherIdentity()
    if not path.is_file():
        return TeacherIdentity()
    try:  # mmap: the weights are not read a second time
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # a legacy (non-zip) file cannot be mmapped; read_state_dict has already read it
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict):
        return TeacherIdentity()
    if isinstance(checkpoint.get(IDENTITY_KEY), dict):
        return TeacherIdentity(**checkpoint[IDENTITY_KEY])
    stored = checkpoint.get(_RUN_CONFIG_KEY)
    if isinstance(stored, dict) and "model" in stored and "data" in stored:
        model, data = stored["model"], stored["data"]
        return TeacherIdentity(architecture=model.get("name") or model.get("model_name"),
                               mean=tuple(data["mean"]) if "mean" in data else None,
                               std=tuple(data["std"]) if "std" in data else None,
                               image_size=data.get("image_size"), interpolation=data.get("interpolation"),
                               class_names=stored.get("class_names"))
    return TeacherIdentity()


def state_sha256(state: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def suggest_architecture(state: dict[str, Tensor], identity: TeacherIdentity) -> str:
    """Which timm architecture the file looks like: from its identity when it is ours, else by trying the
    small RegNets whose key layout fits (cheap to build)."""
    if identity.architecture:
        return f"the file is a {identity.architecture}: set teacher.model_name={identity.architecture}"
    classes = next((v.shape[0] for k, v in state.items() if k.endswith("fc.weight")), 1000)
    for name in ("regnetx_002", "regnety_160", "regnetx_004", "regnety_002", "regnety_004", "regnetx_160",
                 "resnet50"):
        with torch.device("meta"):
            candidate = timm.create_model(name, num_classes=classes)
        expected = {k: tuple(v.shape) for k, v in candidate.state_dict().items()}
        if expected == {k: tuple(v.shape) for k, v in state.items()}:
            return f"it looks like a {name}: set teacher.model_name={name}"
    return "set teacher.model_name to the timm architecture the file was saved from"
