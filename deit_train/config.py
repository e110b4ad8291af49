"""Hydra/OmegaConf glue: where the configs live and the resolvers they use."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from deit_train.errors import ConfigError

# Installed from a wheel the configs are package data (deit_train/configs); in the repository (and editable
# installs) they are its top-level configs/.
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def register_resolvers() -> None:
    # ${ne:${distill.distill_type},none}: a student gets a distillation token exactly when it distils.
    if not OmegaConf.has_resolver("ne"):
        OmegaConf.register_new_resolver("ne", lambda a, b: a != b)
    # ${required:model.init_from,<what to pass>}: a value an experiment cannot run without. ("???" would not
    # do: merged over a group's default it leaves the default in place.)
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required)


def _required(option: str, hint: str) -> None:
    raise ConfigError(f"{option} is not set: pass {option}={hint}")
