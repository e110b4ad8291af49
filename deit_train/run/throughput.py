"""Training throughput as a user means it: images per second of wall-clock time, data loading included."""
from __future__ import annotations

import time

import lightning as L
from lightning.pytorch.callbacks import Callback


class WallClockThroughput(Callback):
    """Logs ``train/throughput`` once per epoch: the images of all ranks divided by the seconds between
    consecutive batch starts (loading the next batch, the step, the logging: everything an epoch waits for).

    The first batch's wait (workers starting) and the last batch (its end overlaps validation) are left out:
    the rate is the epoch's steady state. An epoch of one batch has no interval and logs nothing. No device
    synchronisation is needed: over many steps the batch starts are paced by the slowest of loader and device.
    """

    def __init__(self) -> None:
        self._reset()  # also the state of an epoch resumed mid-way (no on_train_epoch_start then)

    def _reset(self) -> None:
        self._first_start: float | None = None
        self._last_start: float | None = None
        self._images = 0  # of the batches before the last start
        self._pending = 0  # of the batch that started last

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._first_start is None:
            self._first_start = now
        self._images += self._pending
        self._last_start = now
        self._pending = len(batch[0]) * trainer.world_size

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._images and self._last_start > self._first_start:
            pl_module.log("train/throughput", self._images / (self._last_start - self._first_start),
                          on_step=False, on_epoch=True, rank_zero_only=True)
