"""A non-editable install (a wheel) carries its configs: `python -m deit_train` works outside the repository."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import yaml

from conftest import ROOT


def test_wheel_ships_modules_and_configs_and_composes_from_elsewhere(tmp_path):
    source = tmp_path / "src"  # a copy, so the build writes nothing into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("deit_train", "hydra_plugins", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("deit_train-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for top in ("deit_train", "hydra_plugins")
               for p in (ROOT / top).rglob("*.py")}
    configs = {f"deit_train/configs/{p.relative_to(ROOT / 'configs').as_posix()}"
               for p in (ROOT / "configs").rglob("*.yaml")}
    assert modules - names == set() and configs - names == set()

    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the wheel's deit_train comes first; its configs can only be its own (no repository next to site/)
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    run = subprocess.run([sys.executable, "-m", "deit_train", "experiment=quickstart", "--cfg", "job"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    job = yaml.safe_load(run.stdout)
    assert job["task_name"] == "quickstart" and job["model"]["hidden_size"] > 0
    # Hydra finds the installed search sweeper in the hydra_plugins namespace package (hparams_search=...)
    sweepers = subprocess.run([sys.executable, "-c", "from hydra.core.plugins import Plugins; from hydra.plugins.sweeper "
                               "import Sweeper; print([c.__module__ for c in Plugins.instance().discover(Sweeper)])"],
                              cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert f"'hydra_plugins.deit_train_optuna_sweeper.optuna_sweeper'" in sweepers.stdout, sweepers.stderr[-2000:]
    assert str(site) in subprocess.run(
        [sys.executable, "-c", "import hydra_plugins.deit_train_optuna_sweeper as p; print(p.__file__)"], cwd=elsewhere,
        env=env, capture_output=True, text=True, timeout=300).stdout

    # pip wrote the console scripts; one run shows they call the installed package (its exit status passed on)
    assert {"deit-train", "deit-eval", "deit-export", "deit-predict", "deit-compare"} <= {
        p.name for p in (site / "bin").iterdir()}
    compare = subprocess.run([str(site / "bin" / "deit-compare")], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=300)
    assert compare.returncode == 2 and compare.stderr.startswith("error: no runs found in outputs multirun")


def test_search_sweeper_is_found_outside_the_repository_with_the_editable_install(tmp_path):
    """The README installs with ``pip install -e``: its hydra_plugins portion is an import hook, not a folder Hydra's
    plugin scan walks. Run from another folder, a search must still reach the sweeper (here: its space check)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONWARNINGS="ignore", DEIT_TRAIN_OUTPUTS=str(tmp_path / "outputs"))
    installed = subprocess.run([sys.executable, "-c", "import deit_train; print(deit_train.__file__)"], cwd=tmp_path,
                               env=env, capture_output=True, text=True, timeout=300)
    assert installed.stdout.startswith(str(ROOT)), "run the suite where the README's install (pip install -e) was made"
    run = subprocess.run([sys.executable, "-m", "deit_train", "-m", "hparams_search=quickstart_distill",
                          "experiment=quickstart", "model.no_such_option=interval(0.0,1.0)"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.startswith("error: hydra.sweeper.params: model.no_such_option is not an option of this config")
    assert run.stderr.count("\n") == 1 and not list(tmp_path.rglob("results.json"))
