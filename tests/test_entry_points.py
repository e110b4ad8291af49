"""The console scripts of pyproject.toml resolve to commands that start by freezing their imports, and its package
list names every package folder."""
from __future__ import annotations

import gc
import importlib
import inspect
import io
import tomllib
from contextlib import redirect_stderr, redirect_stdout

import pytest
from hydra.core.global_hydra import GlobalHydra

from conftest import ROOT
from deit_train.run import environment
from deit_train.run.environment import freeze_imported_objects

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
    folders = {".".join(p.parent.relative_to(ROOT).parts) for top in ("deit_train", "hydra_plugins")
               for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts}
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - folders == {"deit_train.configs"}  # mapped from configs/ by package-dir


def test_imported_objects_are_frozen_once_per_process():
    gc.unfreeze()  # conftest froze the test process's imports
    freeze_imported_objects()
    frozen = gc.get_freeze_count()
    assert frozen > 100_000  # torch, Lightning, timm and Hydra are imported
    made_after = [[] for _ in range(1000)]  # alive: a second freeze would add them to the count
    freeze_imported_objects()  # a second command in the same process leaves what the first one made alone
    assert gc.get_freeze_count() <= frozen and made_after  # (frozen objects freed since leave the count)


def test_every_console_script_freezes_the_imported_objects_first(monkeypatch):
    class CountingGc:  # the freeze as each command's process would see it: nothing frozen yet
        calls = 0

        def get_freeze_count(self):
            return 0

        def freeze(self):
            CountingGc.calls += 1

    monkeypatch.setattr(environment, "gc", CountingGc())
    for name, target in PYPROJECT["project"]["scripts"].items():
        module_name, _, attribute = target.partition(":")
        command = getattr(importlib.import_module(module_name), attribute)
        monkeypatch.setattr("sys.argv", [name, "--help"])
        before = CountingGc.calls
        out, err = io.StringIO(), io.StringIO()
        with pytest.raises(SystemExit) as exited, redirect_stdout(out), redirect_stderr(err):
            command()
        assert exited.value.code in (0, None) and out.getvalue().strip(), f"{name} --help: {err.getvalue()}"
        assert CountingGc.calls == before + 1, name
        assert not GlobalHydra.instance().is_initialized()  # a Hydra command's help leaves no state behind
