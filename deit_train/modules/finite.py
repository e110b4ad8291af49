"""Stop a run at the first non-finite loss, as the official DeiT ``engine.py`` does (``sys.exit(1)``).

Raised inside ``training_step``, before the backward pass and the optimizer step: the weights that produced the
last checkpoint are never updated with a NaN, and no checkpoint is written on the way out.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import Tensor

from deit_train.errors import ConfigError


class NonFiniteLossError(ConfigError):
    """The training loss became NaN or infinite; the message says where and which term."""


def check_finite(module: L.LightningModule, loss: Tensor, terms: Callable[[], Mapping[str, Tensor | None]]) -> None:
    """Raise :class:`NonFiniteLossError` when ``loss`` is not finite. ``terms`` (called only then) maps each
    input of the loss to its tensor; the message names those that are not finite."""
    finite = bool(torch.isfinite(loss.detach()).all())
    trainer = module._trainer  # None when a step is called outside a Trainer
    if trainer is not None and trainer.world_size > 1:  # every rank stops together, none waits in the next all-reduce
        finite = not trainer.strategy.reduce_boolean_decision(not finite, all=False)
    if finite:
        return
    bad = [name for name, tensor in terms().items() if tensor is not None and not bool(torch.isfinite(tensor).all())]
    if bool(torch.isfinite(loss.detach()).all()):
        where = "loss on another rank"
    else:
        where = ", ".join(bad) if bad else "the loss itself (its inputs are finite)"
    raise NonFiniteLossError(
        f"the training loss is {loss.detach().float().item()} at epoch {module.current_epoch}, step "
        f"{module.global_step}: non-finite {where}; the run stopped and the last good checkpoint is kept: lower "
        f"optim.base_lr, add trainer.gradient_clip_val or use trainer.precision=32-true")
