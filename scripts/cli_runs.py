"""What the benchmark and smoke scripts share: a random-weight teacher file, one ``python -m deit_train`` run as a
user types it, and what its run directory says.

Imported by the scripts beside it (``python scripts/<name>.py`` puts this folder on ``sys.path``).
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch

ROOT = Path(__file__).resolve().parents[1]


def random_teacher_file(path: Path, model_name: str = "regnety_160", num_classes: int = 1000) -> Path:
    """A timm ``model_name`` with random weights (seed 0) saved as a plain state dict: a local teacher file, no
    download."""
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(timm.create_model(model_name, num_classes=num_classes).state_dict(), path)
    return path


def run_cli(args: Sequence[str], run_dir: Path, env: Mapping[str, str] | None = None,
            entry: Sequence[str] = ("-m", "deit_train")) -> subprocess.CompletedProcess:
    """``python -m deit_train <args> hydra.run.dir=<run_dir>`` from the repository root; never raises on failure."""
    environ = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, *entry, *args, f"hydra.run.dir={run_dir}"], cwd=ROOT, env=environ,
                          capture_output=True, text=True)


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``<run_dir>/csv/metrics.csv`` (none when the run wrote none)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def last_epoch_throughput(run_dir: Path) -> float | None:
    """``train/throughput`` (img/s) of the run's last epoch: the figure runs are compared by (earlier epochs warm up)."""
    epochs = [float(r["train/throughput"]) for r in metrics_rows(run_dir) if r.get("train/throughput")]
    return epochs[-1] if epochs else None
