"""Reading weights from the files people keep them in, and starting a student from them."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.models.hf_convert import is_hf_directory, read_hf_directory
from deit_train.models.simmim import ENCODER_PREFIX, PRETRAINING_ONLY_KEYS

log = logging.getLogger(__name__)

# Prefixes wrappers put in front of the network's own keys: our LightningModules, DDP, torch.compile.
_WRAPPER_PREFIXES = ("student.", "module.", "_orig_mod.")
# Which weights of a checkpoint to read (the ``weights=`` option of eval, export, predict and average): the trained
# student, or the EMA of it a run kept (``module.ema_decay``)
WEIGHTS = ("student", "ema")
# Where other trainers keep their EMA: the official DeiT main.py (``model_ema``), timm's train.py (``state_dict_ema``)
_EMA_CHECKPOINT_KEYS = ("model_ema", "state_dict_ema")
# The EMA's keys in a checkpoint of this project, beside ``student.`` (ClassificationModule.on_save_checkpoint)
EMA_PREFIX = "ema."
# Keys a student may start without: a new classifier, for a CLS-only source the distillation token, and for a
# mean-pooled student (global_pool=avg) the norm after pooling.
_NEWLY_INITIALISED = ("head.", "head_dist.", "dist_token", "fc_norm.")


def check_weights(weights: str) -> None:
    if weights not in WEIGHTS:
        raise ConfigError(f"weights={weights} is not one of {', '.join(WEIGHTS)}")


def read_state_dict(path: str | Path, weights: str = "student") -> dict[str, Tensor]:
    """Weights from a plain state dict, a timm/official-DeiT file (``model`` key), a Lightning
    checkpoint of this project (``state_dict`` with ``student.`` keys), a SimMIM pretraining checkpoint
    (its encoder's keys become the student's; ``mask_token`` and ``decoder.*`` stay), a ``.safetensors`` file
    or an HF transformers DeiT/ViT directory.

    ``weights="ema"``: the EMA of the student instead (``ema.*`` keys of our checkpoints, ``model_ema`` of the
    official DeiT's, ``state_dict_ema`` of timm's); one line naming the option when the file has none."""
    check_weights(weights)
    path = Path(path).expanduser()
    if is_hf_directory(path):  # a transformers save_pretrained directory: converted to timm keys
        if weights == "ema":
            raise _no_ema(path, "a transformers directory holds one set of weights")
        return read_hf_directory(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} does not exist: check the path you passed")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path))
        else:
            # Checkpoints of this project carry their Hydra config, which weights_only refuses.
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise ConfigError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if weights == "ema":
        return {_strip_prefixes(k): v for k, v in _ema_state(checkpoint, path).items()}
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, Tensor) for v in checkpoint.values()):
        raise ConfigError(f"checkpoint {path} holds no state dict (expected tensors, or a 'model'/'state_dict' key)")
    if any(k.startswith("student.") for k in checkpoint):  # drop the teacher and EMA copies of a LightningModule
        checkpoint = {k: v for k, v in checkpoint.items() if k.startswith("student.")}
    return _simmim_encoder_as_student({_strip_prefixes(k): v for k, v in checkpoint.items()})


def _no_ema(path: Path, why: str) -> ConfigError:
    return ConfigError(f"weights=ema: {path} has no EMA weights ({why}): use weights=student, or train with "
                       "module.ema_decay=<decay> (e.g. 0.99996)")


def _ema_state(checkpoint, path: Path) -> dict[str, Tensor]:
    """The EMA's state dict in a loaded checkpoint (keys still carrying their wrappers' prefixes)."""
    if not isinstance(checkpoint, dict):
        raise _no_ema(path, "it holds no state dict")
    for key in _EMA_CHECKPOINT_KEYS:
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    state = checkpoint.get("state_dict") if isinstance(checkpoint.get("state_dict"), dict) else checkpoint
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX) and isinstance(v, Tensor)}
    if not ema:
        raise _no_ema(path, "the run trained with module.ema_decay=null" if any(k.startswith("student.") for k in state)
                      else f"no {EMA_PREFIX}*, {' or '.join(_EMA_CHECKPOINT_KEYS)} keys")
    return ema


def _simmim_encoder_as_student(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``[model.]encoder.*`` of a SimMIM checkpoint (a ``SimMIMModule``'s or a bare ``SimMIM``'s) -> ``*``."""
    if "model.mask_token" in state:  # SimMIMModule keeps the SimMIM network in ``model``
        state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    if "mask_token" not in state or not any(k.startswith(ENCODER_PREFIX) for k in state):
        return state
    return {k.removeprefix(ENCODER_PREFIX): v for k, v in state.items()}


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _fit_pos_embed(source: Tensor, model: nn.Module, source_prefix: int) -> Tensor:
    """Resample the patch grid to the model's and add/drop the distillation token's slot."""
    target_prefix = model.num_prefix_tokens
    grid = model.patch_embed.grid_size
    source = resample_abs_pos_embed(source, new_size=list(grid), num_prefix_tokens=source_prefix)
    prefix, patches = source[:, :source_prefix], source[:, source_prefix:]
    if target_prefix > source_prefix:  # CLS-only source -> distilled model: dist slot starts as the CLS slot
        prefix = torch.cat([prefix, prefix[:, :1].expand(-1, target_prefix - source_prefix, -1)], dim=1)
    return torch.cat([prefix[:, :target_prefix], patches], dim=1)


def check_shapes(state: dict[str, Tensor], target: dict[str, Tensor], source: str,
                 hint: str = "check model.hidden_size/patch_size/mlp_ratio") -> None:
    """One line naming ``source`` (``<option>=<path>``) when weights of the same name differ in shape."""
    mismatched = [f"{k} {tuple(v.shape)} vs model {tuple(target[k].shape)}" for k, v in state.items()
                  if k in target and v.shape != target[k].shape]
    if mismatched:
        raise ConfigError(f"{source} has other shapes than the model: {mismatched[:4]}"
                          f"{'...' if len(mismatched) > 4 else ''}; {hint}")


def load_exact(model: nn.Module, state: dict[str, Tensor], source: str, hint: str,
               may_lack: tuple[str, ...] = ()) -> None:
    """Load every weight of ``model`` from ``state`` as it is (no resampling, no new heads): for evaluating a
    file, where a weight made up here would change what is measured. Only keys starting with ``may_lack`` may be
    absent (the caller then does not use them)."""
    check_shapes(state, model.state_dict(), source, hint)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(may_lack)] if may_lack else missing
    if missing or unexpected:
        raise ConfigError(f"{source} does not fit the model: missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
                          f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}; {hint}")


def load_student_weights(model: nn.Module, path: str | Path, strict_extra: tuple[str, ...] = (),
                         weights: str = "student") -> None:
    """Start ``model`` from ``path``: every backbone weight must be there; only the classifier heads
    (when the class count differs or the source has no such head) and the distillation token may be new.
    Position embeddings are interpolated when the resolution differs. From a SimMIM checkpoint the encoder
    is loaded and its mask token and pixel decoder are left behind. ``weights``: see :func:`read_state_dict`."""
    state = read_state_dict(path, weights)
    if "mask_token" in state:
        strict_extra = (*strict_extra, *PRETRAINING_ONLY_KEYS)
    target = model.state_dict()
    if "pos_embed" in state and "pos_embed" in target and state["pos_embed"].shape != target["pos_embed"].shape:
        source_prefix = 2 if "dist_token" in state else 1
        state["pos_embed"] = _fit_pos_embed(state["pos_embed"], model, source_prefix)
    dropped = [k for k in list(state) if k.startswith(("head.", "head_dist.")) and k in target
               and state[k].shape != target[k].shape]
    if "fc_norm.weight" in target and "norm.weight" not in target:  # mean pooling: the final norm moves after
        dropped += [k for k in state if k.startswith("norm.")]  # pooling and starts new, as SimMIM fine-tunes
    for key in dropped:
        del state[key]
    check_shapes(state, target, f"model.init_from={path}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    new = [k for k in missing if k.startswith(_NEWLY_INITIALISED)]
    missing = [k for k in missing if not k.startswith(_NEWLY_INITIALISED)]
    unexpected = [k for k in unexpected if not k.startswith(_NEWLY_INITIALISED + strict_extra)]
    if missing or unexpected:
        raise ConfigError(
            f"model.init_from={path} does not fit the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; check model size and distilled flag"
        )
    log.info("initialised student from %s (new: %s%s)", path, ", ".join(new) or "none",
             f"; left behind: {', '.join(dropped)}" if dropped else "")
