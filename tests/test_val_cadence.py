"""With trainer.check_val_every_n_epoch > 1, last.ckpt is still written after every epoch (a preempted job loses
at most one epoch) and the final epoch is validated (last_epoch/val/* is the final epoch's)."""
from __future__ import annotations

import csv
import json

import lightning as L
import pytest
import torch

from conftest import compose_config
from deit_train.train import train

FAKE = ["data=fake", "trainer=cpu", "data.num_classes=10", "data.num_train=16", "data.num_val=8",
        "data.source_size=[16,16]", "data.batch_size=8", "data.num_workers=0", "model=deit_tiny",
        "model.image_size=16", "model.patch_size=4", "model.hidden_size=32", "model.num_hidden_layers=1",
        "model.num_attention_heads=2", "distill=none", "model.distilled=false", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "test=false", "optim.min_lr=1e-6"]


class LastCheckpointAtEpochStart(L.Callback):
    """The epoch of last.ckpt as each epoch starts (added through the callbacks config)."""
    seen: dict[int, int | None] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        path = trainer.checkpoint_callbacks[0].dirpath + "/last.ckpt"
        try:
            self.seen[trainer.current_epoch] = torch.load(path, weights_only=False)["epoch"]
        except FileNotFoundError:
            self.seen[trainer.current_epoch] = None


def test_last_checkpoint_every_epoch_and_the_final_epoch_validated(tmp_path):
    LastCheckpointAtEpochStart.seen.clear()
    results = train(compose_config([*FAKE, "trainer.max_epochs=5", "trainer.check_val_every_n_epoch=3",
                                    "+callbacks.probe._target_=test_val_cadence.LastCheckpointAtEpochStart"], tmp_path))
    assert LastCheckpointAtEpochStart.seen == {0: None, 1: 0, 2: 1, 3: 2, 4: 3}
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 4
    with open(tmp_path / "csv" / "metrics.csv", newline="") as handle:
        val = {int(r["epoch"]): float(r["val/top1"]) for r in csv.DictReader(handle) if r.get("val/top1")}
    assert sorted(val) == [2, 4]  # every 3rd epoch, and the final one (5 is not a multiple of 3)
    assert results["last_epoch/val/top1"] == pytest.approx(val[4])
    assert json.loads((tmp_path / "results.json").read_text())["last_epoch/val/top1"] == pytest.approx(val[4])
