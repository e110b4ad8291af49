"""The console scripts of pyproject.toml resolve to commands, and its package list names every package folder."""
from __future__ import annotations

import importlib
import inspect
import tomllib

from conftest import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_console_scripts_resolve_to_callables_that_take_no_arguments():
    scripts = PYPROJECT["project"]["scripts"]
    assert {"deit-train", "deit-eval", "deit-export", "deit-predict", "deit-compare"} <= set(scripts)
    for name, target in scripts.items():
        module_name, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        # a console script calls it with no arguments (and passes its return value to sys.exit); a Hydra main
        # is the wrapper Hydra made, not the function it wraps
        required = [p for p in inspect.signature(command, follow_wrapped=False).parameters.values()
                    if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert callable(command) and not required, f"{name} = {target} needs {required}"


def test_package_list_names_every_package_folder():
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "deit_train").rglob("*.py")
               if "__pycache__" not in p.parts}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - folders == {"deit_train.configs"}  # mapped from configs/ by package-dir
