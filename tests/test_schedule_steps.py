"""The lr schedule counts epochs in the loader's optimizer updates per epoch, however the run is bounded
(``trainer.max_epochs`` or ``trainer.max_steps``)."""
from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import cosine_lr
from deit_train.modules.optim import OptimRecipe, RecipeTrainedModule

PEAK, WARMUP_LR, MIN_LR = 5e-4, 1e-6, 1e-5


class _Data(L.LightningDataModule):
    batch_size = 1

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(100, 2)), batch_size=self.batch_size)  # 100 batches an epoch


class _Recorder(RecipeTrainedModule):
    def __init__(self):
        super().__init__()
        self.student = nn.Linear(2, 1)
        self.optim = OptimRecipe(base_lr=PEAK, reference_batch=1, warmup_epochs=5, warmup_lr=WARMUP_LR, min_lr=MIN_LR)
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])  # the lr this update uses
        return self.student(batch[0]).pow(2).mean()


def _intended(update: int, total: int, warmup: int, peak: float = PEAK) -> float:
    return cosine_lr(update, total, warmup, peak, WARMUP_LR, MIN_LR)


@pytest.mark.parametrize("max_epochs", [300, None])  # 300 = configs/trainer/default.yaml
def test_max_steps_keeps_warmup_epochs_in_the_loaders_updates(max_epochs):
    module = _Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=1000, max_epochs=max_epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=_Data())
    assert module.hparams_resolved["optim/steps_per_epoch"] == 100
    assert len(module.lrs) == 1000
    # warmup: 5 epochs x 100 updates = 500 (total_steps // max_epochs gave 15, and with max_epochs=null the whole
    # run was warmup); then the cosine over the remaining 500 updates
    assert module.lrs == pytest.approx([_intended(u, 1000, 500) for u in range(1000)], rel=1e-6)
    assert max(module.lrs) == pytest.approx(_intended(500, 1000, 500))


def test_accumulation_divides_the_updates_per_epoch():
    module = _Recorder()
    trainer = L.Trainer(accelerator="cpu", max_steps=200, accumulate_grad_batches=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=_Data())
    assert module.hparams_resolved["optim/steps_per_epoch"] == 25  # ceil(100 batches / 4)
    peak = 4 * PEAK  # the global batch is 4 (linear scaling rule, reference batch 1)
    per_update = module.lrs[::4]
    assert per_update == pytest.approx([_intended(u, 200, 125, peak) for u in range(200)], rel=1e-6)
