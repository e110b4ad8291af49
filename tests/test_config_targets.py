"""Every class or function a config names (``_target_``) exists: a module moved without its configs fails here,
not in the first run that instantiates it."""
from __future__ import annotations

import importlib
import re

import pytest

from deit_train.run.config import CONFIG_DIR

TARGETS = sorted({match for path in CONFIG_DIR.rglob("*.yaml")
                  for match in re.findall(r"_target_:\s*([\w.]+)", path.read_text())})


def test_the_configs_name_targets():
    assert any(t.startswith("deit_train.") for t in TARGETS) and len(TARGETS) > 10


@pytest.mark.parametrize("target", TARGETS)
def test_config_target_resolves(target):
    module, _, attribute = target.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attribute)), target
