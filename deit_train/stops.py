"""Rank-wide stops: when one process of a run meets a reason to stop, every process stops on the same decision,
with the same one line (exit status 2), and the last good checkpoint is kept.

A check that fails on one DDP process must not raise there alone: the others would wait in the step's next
collective (NCCL: until the process-group timeout, every GPU idle) or die of the closed connection (gloo). So

- a check inside a training step records its line (:func:`defer_stop`) and the step goes on with valid values
  (the teacher-cache drift guard: the live teacher's logits);
- a batch this rank could not make (a corrupt file, in a loader worker or in the device decode) arrives as a
  :class:`~deit_train.errors.StoppedBatch` carrying its line;
- a condition known on the device alone (a non-finite loss) is watched (:meth:`RankWideStop.watch`) without being
  read back each step.

:class:`RankWideStop` decides for all ranks at once: before every batch (training, validation, test) on what the
ranks know on the host (one process: no device read; several: one all-reduce that also carries the device
conditions, read once), and before every checkpoint is written and when training ends on everything, device
conditions included (a non-finite update is never saved, and a run never ends 0 after one). The lowest rank that met a stop hands its line to the
others, and every rank raises it.
"""
from __future__ import annotations

import threading
from typing import Protocol

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from deit_train.errors import ConfigError, StoppedBatch


class DeviceCondition(Protocol):
    """A reason to stop that lives on the device."""

    def stop_flag(self) -> Tensor:
        """A 0-d tensor on the device, nonzero when the run must stop; not read by the caller's step."""

    def stop_error(self) -> ConfigError:
        """The line to stop with; asked (and read back) only on a rank whose flag is set."""


class RankWideStop(Callback):
    """Takes the stops of this rank (:meth:`defer`, stopped batches, :meth:`watch`) and decides with every rank."""

    def __init__(self) -> None:
        self._error: ConfigError | None = None
        self._conditions: list[DeviceCondition] = []

    @staticmethod
    def of(trainer: L.Trainer | None) -> "RankWideStop | None":
        """The decider of ``trainer``'s run, or None (no trainer, or one built without it)."""
        callbacks = getattr(trainer, "callbacks", None) or []
        return next((callback for callback in callbacks if isinstance(callback, RankWideStop)), None)

    def defer(self, error: ConfigError) -> None:
        """Stop with ``error`` at the next decision (the first one this rank met is kept)."""
        if self._error is None:
            self._error = error

    def watch(self, condition: DeviceCondition) -> None:
        """Read ``condition`` at the decisions that read the device."""
        if not any(known is condition for known in self._conditions):
            self._conditions.append(condition)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._error = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._before_batch(trainer, batch)

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        self._before_batch(trainer, batch)

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        self._before_batch(trainer, batch)

    def _before_batch(self, trainer: L.Trainer, batch) -> None:
        if isinstance(batch, StoppedBatch):
            self.defer(batch.error)
        # one process: the host's reasons only, nothing read from the device; several: the all-reduce is read
        # back anyway, so it carries the device conditions too
        self.decide(trainer, read_device=trainer.world_size > 1)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        self.decide(trainer, read_device=True)  # every rank is here (trainer.save_checkpoint), before rank 0 writes

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.decide(trainer, read_device=True)

    def decide(self, trainer: L.Trainer, read_device: bool) -> None:
        """Raise the stop that the lowest rank met, on every rank; return when no rank met one. A collective: every
        rank calls it at the same point."""
        conditions = self._conditions if read_device else []
        if trainer.world_size == 1:
            if self._error is not None:
                raise self._error
            for condition in conditions:
                if bool(condition.stop_flag()):
                    raise condition.stop_error()
            return
        world, rank = trainer.world_size, trainer.global_rank
        device = trainer.strategy.root_device
        # per reason (this rank's host line, then each device condition): this rank where it holds, else world
        codes = torch.stack([torch.full((), world if self._error is None else rank, device=device),  # a fill, no copy
                             *(torch.where(condition.stop_flag().bool(), rank, world) for condition in conditions)])
        torch.distributed.all_reduce(codes, op=torch.distributed.ReduceOp.MIN)  # the lowest rank that holds it
        for reason, source in enumerate(codes.tolist()):
            if source == world:
                continue
            error = None
            if rank == source:
                error = self._error if reason == 0 else conditions[reason - 1].stop_error()
            line = trainer.strategy.broadcast(str(error) if error is not None else None, src=source)
            _stand_down_child_observer()
            raise error if error is not None else ConfigError(line)


def _stand_down_child_observer() -> None:
    """Lightning's launcher (in the process that started the others, ``trainer.devices=N``) SIGKILLs every process
    when one of its children ends non-zero, to spare a lone crash's survivors their wait; here every rank ends with
    status 2 on purpose, and that process must live to print its line and give its status."""
    for thread in threading.enumerate():
        if thread.name == "child-process-observer":  # lightning.fabric's _ChildProcessObserver
            thread._run = lambda: True  # its next look ends it, killing nothing


def defer_stop(trainer: L.Trainer | None, error: ConfigError) -> None:
    """Stop the run with ``error`` at its next rank-wide decision; at once where no :class:`RankWideStop` decides
    (no trainer: the teacher-only pass, a benchmark)."""
    stop = RankWideStop.of(trainer)
    if stop is None:
        raise error
    stop.defer(error)
