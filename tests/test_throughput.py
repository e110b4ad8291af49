"""train/throughput is the wall-clock rate, data loading included: a data set that sleeps bounds it."""
from __future__ import annotations

import csv
import time

import lightning as L
import pytest
from torchvision.datasets import FakeData

from conftest import compose_config
from deit_train.train import train

SLEEP = 0.01  # seconds per image loaded
BATCH = 8
FAKE = ["data=fake", "trainer=cpu", "data.num_classes=10", "data.num_train=64", "data.num_val=8",
        "data.source_size=[16,16]", f"data.batch_size={BATCH}", "data.num_workers=0", "model=deit_tiny",
        "model.image_size=16", "model.patch_size=4", "model.hidden_size=32", "model.num_hidden_layers=1",
        "model.num_attention_heads=2", "distill=none", "model.distilled=false", "trainer.max_epochs=2",
        "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "test=false", "optim.min_lr=1e-6"]


class BatchStarts(L.Callback):
    """The test's own clock of every batch start (added through the callbacks config)."""
    starts: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.setdefault(trainer.current_epoch, []).append(time.perf_counter())


def test_throughput_counts_the_time_spent_loading(tmp_path, monkeypatch):
    original = FakeData.__getitem__

    def slow(self, index):
        time.sleep(SLEEP)
        return original(self, index)

    monkeypatch.setattr(FakeData, "__getitem__", slow)
    BatchStarts.starts.clear()
    train(compose_config([*FAKE, "+callbacks.batch_starts._target_=test_throughput.BatchStarts"], tmp_path))
    with open(tmp_path / "csv" / "metrics.csv", newline="") as handle:
        rates = {int(r["epoch"]): float(r["train/throughput"]) for r in csv.DictReader(handle)
                 if r.get("train/throughput")}
    assert sorted(rates) == [0, 1]
    for epoch, rate in rates.items():
        assert rate < BATCH / (BATCH * SLEEP)  # loading alone allows at most 100 images/s
        first, last = BatchStarts.starts[epoch][0], BatchStarts.starts[epoch][-1]
        expected = (len(BatchStarts.starts[epoch]) - 1) * BATCH / (last - first)  # 7 intervals between 8 batch starts
        assert rate == pytest.approx(expected, rel=0.02)

