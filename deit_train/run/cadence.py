"""Validation cadence: the final epoch is always validated, whatever ``trainer.check_val_every_n_epoch`` says."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class ValidateFinalEpoch(Callback):
    """With ``trainer.check_val_every_n_epoch=n`` Lightning validates epochs n-1, 2n-1, ...; when n does not
    divide ``trainer.max_epochs`` the final epoch would go unvalidated and ``last_epoch/val/*`` would be an older
    epoch's. Before the final epoch this validates it too."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        if final and (trainer.check_val_every_n_epoch or 1) > 1:
            trainer.check_val_every_n_epoch = 1
