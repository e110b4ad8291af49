"""Hydra/OmegaConf glue: where the configs live and the resolvers they use."""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def register_resolvers() -> None:
    # ${ne:${distill.distill_type},none}: a student gets a distillation token exactly when it distils.
    if not OmegaConf.has_resolver("ne"):
        OmegaConf.register_new_resolver("ne", lambda a, b: a != b)
