"""Shared fixtures: tiny teachers saved to disk, Hydra composition and CLI runs in temp dirs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir

from deit_train.run.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_teacher_file(tmp_path_factory) -> Path:
    """An (untrained) regnetx_002 with 10 classes saved as a plain state dict: a stand-in teacher file.

    It recognises nothing, so runs with it pass ``teacher.min_val_top1=0`` (the teacher sanity check stops them)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "regnetx_002_digits.pth"
    torch.save(timm.create_model("regnetx_002", num_classes=10).state_dict(), path)
    return path


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


# A fast digits run: quickstart's models at 16 px with few steps (the quickstart itself is timed in the README).
FAST_DIGITS = [
    "model.image_size=16", "model.patch_size=4", "model.hidden_size=32", "model.num_hidden_layers=2",
    "model.num_attention_heads=2", "trainer.limit_train_batches=4", "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2", "data.batch_size=16",
]


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
