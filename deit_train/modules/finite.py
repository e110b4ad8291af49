"""Stop a run at the first non-finite training loss, as the official DeiT ``engine.py`` does (``sys.exit(1)``),
without reading the loss back every step.

Each step records on the device whether its loss is finite (:class:`FiniteWatch`, no host read); the run's rank-wide
decision (:mod:`deit_train.stops`) reads it before every checkpoint is written and when training ends (and, on
several processes, with its per-batch all-reduce): the update made from a non-finite loss is never saved, every rank
stops with the line of the first non-finite step, and the last good checkpoint is kept.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import Tensor

from deit_train.errors import ConfigError
from deit_train.stops import RankWideStop


class NonFiniteLossError(ConfigError):
    """The training loss became NaN or infinite; the message says where and which term."""


class FiniteWatch:
    """The first non-finite training loss of this rank, recorded on the device: its epoch, step, value and which of
    the loss's inputs were not finite (a :class:`~deit_train.stops.DeviceCondition`)."""

    def __init__(self, names: list[str], device: torch.device, rank: int) -> None:
        self.names, self.rank = names, rank
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # non-finite steps so far
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)  # of the first one
        self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.values = torch.zeros(1 + len(names), device=device)  # its loss, then 1 per non-finite input

    def update(self, loss: Tensor, terms: Mapping[str, Tensor | None], epoch: int, step: int) -> None:
        loss = loss.detach().float().reshape(())
        bad = ~torch.isfinite(loss)
        inputs = [(~torch.isfinite(t.detach()).all()).float() if t is not None else torch.zeros_like(loss)
                  for t in terms.values()]
        first = bad & (self.count == 0)
        self.values = torch.where(first, torch.stack([loss, *inputs]), self.values)
        self.epoch = torch.where(first, epoch, self.epoch)  # a Python number: a kernel argument, no copy
        self.step = torch.where(first, step, self.step)
        self.count += bad

    def stop_flag(self) -> Tensor:
        return self.count > 0

    def stop_error(self) -> NonFiniteLossError:
        epoch, step, (loss, *inputs) = int(self.epoch), int(self.step), self.values.tolist()
        bad = [name for name, flag in zip(self.names, inputs) if flag]
        where = ", ".join(bad) if bad else "the loss itself (its inputs are finite)"
        rank = f" on rank {self.rank}" if self.rank else ""
        return NonFiniteLossError(
            f"the training loss is {loss} at epoch {epoch}, step {step}{rank}: non-finite {where}; the run stopped "
            "and the last good checkpoint is kept: lower optim.base_lr, add trainer.gradient_clip_val or use "
            "trainer.precision=32-true")


def check_finite(module: L.LightningModule, loss: Tensor, terms: Callable[[], Mapping[str, Tensor | None]]) -> None:
    """Record whether ``loss`` is finite; ``terms`` maps each input of the loss to its tensor (the line names those
    that are not finite). The run stops at its next rank-wide decision; at once without a trainer that decides."""
    inputs = terms()
    watch = getattr(module, "_finite_watch", None)
    if watch is None:
        watch = FiniteWatch(list(inputs), loss.device, module.global_rank)
        object.__setattr__(module, "_finite_watch", watch)  # state of the run, not a submodule or buffer
    watch.update(loss, inputs, module.current_epoch, module.global_step)
    stop = RankWideStop.of(module._trainer)  # None when a step is called outside a Trainer
    if stop is not None:
        stop.watch(watch)
    elif bool(watch.stop_flag()):
        raise watch.stop_error()
