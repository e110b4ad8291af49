"""Shared fixtures: tiny teachers saved to disk, Hydra composition and CLI runs in temp dirs."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

# Under pytest-xdist (`-n`) each worker gets its share of the cores, set before torch starts its thread pool and
# inherited by the CLI runs it starts: two workers of two threads each on two cores spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _cores = len(os.sched_getaffinity(0))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest
import timm
import torch
from filelock import FileLock
from hydra import compose, initialize_config_dir

from deit_train.run.config import CONFIG_DIR
from deit_train.run.environment import freeze_imported_objects

freeze_imported_objects()  # as every command does: the collector's passes skip the imports in each test process

ROOT = Path(__file__).resolve().parents[1]


def made_once(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """A folder ``make(folder)`` fills once per test session, also under pytest-xdist: the first worker that asks
    makes it in the session's shared temporary root, under a file lock; the other workers wait for it, then read it.
    (Without xdist each session has its own root: nothing of an earlier session is reused.)"""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        folder = tmp_path_factory.mktemp(name)
        make(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent  # pytest-<n>/, the parent of every worker's popen-gw<k>/
    folder, done = root / name, root / f"{name}.done"
    with FileLock(root / f"{name}.lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way left it
            folder.mkdir()
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def digits_teacher_file(tmp_path_factory) -> Path:
    """An (untrained) regnetx_002 with 10 classes saved as a plain state dict: a stand-in teacher file.

    It recognises nothing, so runs with it pass ``teacher.min_val_top1=0`` (the teacher sanity check stops them)."""
    def make(folder: Path) -> None:
        torch.manual_seed(0)
        torch.save(timm.create_model("regnetx_002", num_classes=10).state_dict(), folder / "regnetx_002_digits.pth")

    return made_once(tmp_path_factory, "teacher", make) / "regnetx_002_digits.pth"


@pytest.fixture(scope="session")
def spread_teacher_net():
    """A regnetx_002 with 10 classes in eval mode whose logits span a few units (an untrained head gives ~0.02,
    where rounding alone would flip argmaxes): for comparing teacher forwards."""
    torch.manual_seed(0)
    net = timm.create_model("regnetx_002", num_classes=10).eval()
    with torch.no_grad():
        net.head.fc.weight.mul_(200)
    return net


def compose_config(overrides: list[str], output_dir: Path):
    """The composed root config, as `python -m deit_train <overrides>` would see it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


def run_cli(args: list[str], run_dir: Path, cache_dir: Path, module: str = "deit_train", timeout: int = 600):
    """Run ``python -m <module> <args>`` as a user would, in its own run dir and cache."""
    env = {**os.environ, "DEIT_TRAIN_CACHE": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", module, *args, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def cosine_lr(update: int, total: int, warmup: int, peak: float, warmup_lr: float, min_lr: float) -> float:
    """The lr of optimizer update ``update`` (from 0) by the DeiT recipe, written out: a linear warmup from
    ``warmup_lr`` over ``warmup`` updates, then a cosine from ``peak`` to ``min_lr`` over the other ones (timm's
    CosineLRScheduler with ``warmup_prefix=True``, counted in updates)."""
    if update < warmup:
        return warmup_lr + update * (peak - warmup_lr) / warmup
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * (update - warmup) / (total - warmup)))


# A fast digits run: quickstart's models at 16 px with few steps (the quickstart itself is timed in the README).
FAST_DIGITS = [
    "model.image_size=16", "model.patch_size=4", "model.hidden_size=32", "model.num_hidden_layers=2",
    "model.num_attention_heads=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "data.batch_size=16",
]


def _logging_state() -> dict:
    loggers = [logging.root, *(l for l in logging.Logger.manager.loggerDict.values() if isinstance(l, logging.Logger))]
    return {logger: (logger.level, list(logger.handlers), logger.propagate, logger.disabled) for logger in loggers}


def _restore_logging(state: dict) -> None:
    """Levels, handlers (left pointing at this run's closed console otherwise) and propagation as they were; loggers
    the run created go back to defaults."""
    for logger in [logging.root, *logging.Logger.manager.loggerDict.values()]:
        if not isinstance(logger, logging.Logger):
            continue
        level, handlers, propagate, disabled = state.get(logger, (logging.NOTSET, [], True, False))
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate, logger.disabled = propagate, disabled


def main_in_process(argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m deit_train argv`` in this process: the same entry point, exit status and console output as a
    subprocess, without starting an interpreter and importing torch, Lightning and timm again (seconds a run).
    It runs in the repository root with ``env`` added to the environment; environment, argv, working directory,
    warning filters and the logging set-up (Hydra configures handlers and levels per run) are restored after.

    A run that must be a process of its own stays with :func:`run_cli`: several processes (DDP, Slurm), a console
    checked for what Python itself prints (warnings), or a process killed mid-run."""
    from deit_train.__main__ import main

    stdout, stderr = io.StringIO(), io.StringIO()
    saved_environ, saved_argv, saved_cwd = dict(os.environ), sys.argv, os.getcwd()
    saved_logging = _logging_state()
    os.environ.update({**(env or {}), "PYTHONWARNINGS": "ignore"})
    sys.argv = command = ["deit_train", *argv]
    os.chdir(ROOT)  # where run_cli runs it
    code = 0
    try:
        with warnings.catch_warnings(), redirect_stdout(stdout), redirect_stderr(stderr):
            warnings.simplefilter("ignore")  # as run_cli's PYTHONWARNINGS=ignore
            try:
                main()
            except SystemExit as exit_info:
                code = exit_info.code if isinstance(exit_info.code, int) else int(exit_info.code is not None)
            except BaseException:  # what the interpreter would print before exiting with 1
                traceback.print_exc()
                code = 1
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        _restore_logging(saved_logging)
    return subprocess.CompletedProcess(command, code, stdout.getvalue(), stderr.getvalue())


def run_cli_in_process(args: list[str], run_dir: Path, cache_dir: Path) -> subprocess.CompletedProcess:
    """:func:`run_cli` in this process (:func:`main_in_process`)."""
    return main_in_process([*args, f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"],
                           {"DEIT_TRAIN_CACHE": str(cache_dir)})


# The session's trained run: a one-epoch quickstart at 16 px (4 optimizer steps, no warmup, the whole test split)
def trained_run_args(teacher_file: Path) -> list[str]:
    return ["experiment=quickstart", f"teacher.checkpoint={teacher_file}", "teacher.min_val_top1=0",
            "trainer.max_epochs=1", *FAST_DIGITS, "optim.warmup_epochs=0", "trainer.log_every_n_steps=1",
            "trainer.limit_test_batches=1.0"]


@dataclass(frozen=True)
class TrainedRun:
    dir: Path
    args: list[str]  # as given to `python -m deit_train` (besides hydra.run.dir and the progress bar)
    process: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, digits_teacher_file) -> TrainedRun:
    """One run of the CLI in its own process, trained once per test session (shared by the xdist workers) and read
    by every test that needs a trained run, its checkpoints or its logs. Read-only: a test that changes it works on
    a copy."""
    args = trained_run_args(digits_teacher_file)

    def make(folder: Path) -> None:
        proc = run_cli(args, folder / "run", folder / "cache")
        (folder / "process.json").write_text(json.dumps([proc.returncode, proc.stdout, proc.stderr]))

    folder = made_once(tmp_path_factory, "trained_run", make)
    returncode, stdout, stderr = json.loads((folder / "process.json").read_text())
    assert returncode == 0, stderr[-3000:]
    return TrainedRun(folder / "run", args, subprocess.CompletedProcess(args, returncode, stdout, stderr))


# ---- a local one-node Slurm cluster (scripts/slurm_local_cluster.sh) ------------------------------------------
SLURM_TOOLS = ("sbatch", "srun", "scontrol", "squeue", "slurmctld", "slurmd", "munged", "mungekey")


def _free_port_pair() -> int:
    for _ in range(50):
        port = random.randint(20000, 40000)
        try:
            for p in (port, port + 1):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port pair for the local Slurm")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Environment of a running one-node Slurm, started once for every test module that needs it (tests/
    test_slurm.py's ``slurm``) and stopped at the end of the session."""
    missing = [tool for tool in SLURM_TOOLS if shutil.which(tool) is None]
    if missing:
        reason = f"Slurm not installed ({', '.join(missing)} missing): scripts/install_slurm.sh"
        if os.environ.get("DEIT_TRAIN_REQUIRE_SLURM") or os.environ.get("CI"):  # CI must not skip these
            pytest.fail(reason)
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster runs slurmd/slurmctld as root")
    state = tmp_path_factory.mktemp("slurm")
    script = str(ROOT / "scripts" / "slurm_local_cluster.sh")
    env = {**os.environ, "SLURM_LOCAL_PORT": str(_free_port_pair()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DEIT_TRAIN_CACHE": str(state / "cache"), "PYTHONWARNINGS": "ignore"}
    started = subprocess.run([script, "start", str(state)], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    env["SLURM_CONF"] = str(state / "slurm.conf")
    env.pop("SLURM_JOB_ID", None)
    try:
        yield env
    finally:
        subprocess.run([script, "stop", str(state)], env=env, capture_output=True, timeout=120)


# The sizes of FAST_DIGITS' student: a DeiT small enough to train in seconds on the 16 px digits.
DIGITS_DEIT = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture(scope="session")
def digits_deit():
    """A distilled DeiT of DIGITS_DEIT's sizes trained in-process on the digits' training split (both heads on the
    labels, no augmentation, data.mean/std 0.5 as configs/data/digits.yaml), in eval mode: a network whose
    accuracy is well above chance, for tests that check a number survives a file format."""
    from torch.nn import functional as F
    from torch.utils.data import DataLoader

    from deit_train.data import DigitsDataModule
    from deit_train.models import create_deit, forward_heads

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains ten times slower on a busy machine's two threads
    model = create_deit(**DIGITS_DEIT, num_classes=10, distilled=True, drop_path_rate=0.0)
    data = DigitsDataModule(image_size=DIGITS_DEIT["image_size"], augment=False)
    data.setup("fit")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = DataLoader(data.train_set, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(12):
        for images, target in loader:
            cls, dist = forward_heads(model, images)
            loss = F.cross_entropy(cls, target) + F.cross_entropy(dist, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.set_num_threads(threads)
    return model.eval()


def count_teacher_calls(monkeypatch) -> Callable[[], int]:
    """Training-time teacher forwards from now on (validation runs without grad and is not counted)."""
    calls = []
    from deit_train.teacher import FrozenTeacher

    original = FrozenTeacher.forward

    def counting(self, x, **options):  # options: features=True (feature distillation)
        calls.append(torch.is_grad_enabled())
        return original(self, x, **options)

    monkeypatch.setattr(FrozenTeacher, "forward", counting)
    return lambda: sum(calls)


@pytest.fixture
def teacher_calls(monkeypatch):
    """:func:`count_teacher_calls` for one test."""
    return count_teacher_calls(monkeypatch)


def train_preempted_then_resumed(overrides: list[str], tmp_path: Path, monkeypatch) -> tuple[dict, dict]:
    """Train ``overrides`` uninterrupted into ``tmp_path/whole``; then again into ``tmp_path/requeued``, killed at the
    5th loss call (3 training steps and 1 validation batch per epoch: inside epoch 1) and resumed in the same run
    directory from its ``last.ckpt``. Returns both runs' results."""
    from deit_train.losses import DeiTDistillation
    from deit_train.train import train

    whole = train(compose_config(overrides, tmp_path / "whole"))
    original, calls = DeiTDistillation.terms, []

    def killed_in_epoch_1(self, *args):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("preempted")
        return original(self, *args)

    monkeypatch.setattr(DeiTDistillation, "terms", killed_in_epoch_1)
    with pytest.raises(RuntimeError, match="preempted"):
        train(compose_config(overrides, tmp_path / "requeued"))
    monkeypatch.setattr(DeiTDistillation, "terms", original)
    assert torch.load(tmp_path / "requeued" / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 0
    return whole, train(compose_config(overrides, tmp_path / "requeued"))  # same run dir: continues from last.ckpt


# ---- the order of the test files -------------------------------------------------------------------------------
# Under pytest-xdist (--dist loadfile, without its reorder by test count) workers take files in collection order.
# The longest files go first (longest-processing-time-first), so that no worker starts one of them when the others
# are nearly done; each took 20 s to 3 min of one worker in `pytest --durations=40` on the 2-core machine.
LONGEST_FIRST = ("test_slurm.py", "test_search.py", "test_gpu_smoke.py", "test_rank_stops.py",
                 "test_resume_allocation.py", "test_stream.py", "test_gpu_paths.py", "test_ddp.py", "test_wandb.py",
                 "test_packaging.py", "test_host_syncs.py", "test_damaged_checkpoints.py", "test_compare.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
