"""The DeiT optimisation recipe: AdamW with the linear lr scaling rule and a per-step cosine schedule.

Everything is timm's: ``create_optimizer_v2`` (no weight decay on norms, biases, position embedding and
the cls/dist tokens -- the model's ``no_weight_decay()`` -- plus optional layer-wise lr decay) and
``CosineLRScheduler`` stepped every optimizer update.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn


@dataclass
class OptimRecipe:
    """Optimizer + schedule hyper-parameters (defaults: DeiT paper, Tab. 9).

    ``lr = base_lr x global_batch / reference_batch``; warmup and the cosine decay are counted in
    optimizer steps (the epoch values are converted with the number of steps per epoch).
    """

    name: str = "adamw"
    base_lr: float = 5e-4
    reference_batch: int = 512
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float | None = None
    warmup_epochs: float = 5.0
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5

    def lr(self, global_batch: int) -> float:
        return self.base_lr * global_batch / self.reference_batch

    def kernel_options(self, model: nn.Module) -> dict:
        """torch's AdamW/Adam step: one fused kernel on CUDA, multi-tensor (foreach) elsewhere; same math."""
        if self.name.lower() not in ("adamw", "adam"):
            return {}
        on_cuda = next(model.parameters()).device.type == "cuda"
        return {"fused": True} if on_cuda else {"foreach": True}

    def build(self, model: nn.Module, global_batch: int, total_steps: int, steps_per_epoch: int):
        optimizer = create_optimizer_v2(
            model, opt=self.name, lr=self.lr(global_batch), weight_decay=self.weight_decay,
            betas=tuple(self.betas), eps=self.eps, layer_decay=self.layer_decay, **self.kernel_options(model),
        )
        warmup_steps = min(int(round(self.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
        scheduler = CosineLRScheduler(
            optimizer,
            t_initial=max(total_steps - warmup_steps, 1),
            lr_min=self.min_lr,
            warmup_t=warmup_steps,
            warmup_lr_init=self.warmup_lr,
            warmup_prefix=True,
            t_in_epochs=False,
        )
        return optimizer, scheduler


class RecipeTrainedModule(L.LightningModule):
    """What every LightningModule here shares: it optimises ``self.<optimized_attr>`` with ``self.optim``.

    The lr follows the real global batch (per-device batch x world size x accumulation); the timm scheduler
    is stepped every optimizer update; parameter counts and the resolved lr go to every logger at fit start.
    """

    optim: OptimRecipe
    optimized_attr: str = "student"

    def global_batch_size(self) -> int:
        per_device = self.trainer.datamodule.batch_size
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        total_steps = int(self.trainer.estimated_stepping_batches)
        steps_per_epoch = max(total_steps // max(self.trainer.max_epochs or 1, 1), 1)
        global_batch = self.global_batch_size()
        optimizer, scheduler = self.optim.build(getattr(self, self.optimized_attr), global_batch, total_steps,
                                                steps_per_epoch)
        self.hparams_resolved = {"optim/global_batch": global_batch, "optim/lr": self.optim.lr(global_batch),
                                 "optim/total_steps": total_steps}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.global_step)

    def parameter_counts(self) -> dict[str, int]:
        model = getattr(self, self.optimized_attr)
        return {f"params/{self.optimized_attr}": sum(p.numel() for p in model.parameters()),
                f"params/{self.optimized_attr}_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def on_fit_start(self) -> None:
        self.param_counts = self.parameter_counts()
        for logger in self.loggers:
            logger.log_hyperparams({**self.param_counts, **getattr(self, "hparams_resolved", {})})
