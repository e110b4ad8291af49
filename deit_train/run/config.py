"""Hydra/OmegaConf glue: where the configs live and the resolvers they use."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from deit_train.errors import ConfigError

# Installed from a wheel the configs are package data (deit_train/configs); in the repository (and editable
# installs) they are its top-level configs/.
_PACKAGE = Path(__file__).resolve().parents[1]
_PACKAGED_CONFIGS = _PACKAGE / "configs"
CONFIG_DIR = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else _PACKAGE.parent / "configs"


def experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def require_experiment(choice: str | None, overrides: list[str]) -> None:
    """A bare ``python -m deit_train`` stops with one line listing the experiments (the root config alone would
    train DeiT-Ti at 224 px on upscaled digits for 300 epochs); any override means the user chose."""
    if choice is None and not overrides:
        raise ConfigError(f"no experiment chosen: pass experiment=<name> ({', '.join(experiment_names())}), "
                          "e.g. `python -m deit_train experiment=quickstart` (CPU, minutes)")


def register_resolvers() -> None:
    # ${ne:a,b}: a != b
    if not OmegaConf.has_resolver("ne"):
        OmegaConf.register_new_resolver("ne", lambda a, b: a != b)
    # ${distillation_token:${distill}}: a student gets a distillation token exactly when its method trains one
    if not OmegaConf.has_resolver("distillation_token"):
        OmegaConf.register_new_resolver("distillation_token", _distillation_token)
    # ${required:model.init_from,<what to pass>}: a value an experiment cannot run without. ("???" would not
    # do: merged over a group's default it leaves the default in place.)
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required)
    # ${subset_tag:${data.train_fraction},${data.split_seed}}: files made from a training subset say which
    if not OmegaConf.has_resolver("subset_tag"):
        from deit_train.data.subset import subset_tag

        OmegaConf.register_new_resolver("subset_tag", subset_tag)


def _distillation_token(distill) -> bool:
    from deit_train.losses import method_reads_token

    return False if distill is None else method_reads_token(distill)


def _required(option: str, hint: str) -> None:
    raise ConfigError(f"{option} is not set: pass {option}={hint}")
