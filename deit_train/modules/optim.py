"""The DeiT optimisation recipe: AdamW with the linear lr scaling rule and a per-step cosine schedule.

Everything is timm's: ``create_optimizer_v2`` (no weight decay on norms, biases, position embedding and
the cls/dist tokens -- the model's ``no_weight_decay()``), ``CosineLRScheduler`` stepped every optimizer
update, and the ``lr_scale`` its schedulers apply per parameter group (layer-wise lr decay, grouped as SimMIM's
``get_vit_layer`` does: :func:`vit_layer_id`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import lightning as L
from lightning.pytorch.plugins.precision import MixedPrecision
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import nn

from deit_train.errors import ConfigError

log = logging.getLogger(__name__)


def vit_layer_id(name: str, depth: int) -> int:
    """SimMIM's ``get_vit_layer``: embeddings 0, block k -> k + 1, everything else (final norm, heads, tokens
    the embeddings do not own such as a new distillation token) ``depth + 1``, i.e. lr x 1."""
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def unwrapped_name(name: str) -> str:
    """A parameter's name in the plain network: without the wrapper segments FSDP (and its activation
    checkpointing) insert, as torch's ``clean_tensor_name`` strips them."""
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def parameter_ndims(model: nn.Module) -> dict[str, int]:
    """Each parameter's number of dimensions by name, read before a strategy wraps the model: FSDP with
    ``use_orig_params`` turns every parameter into a 1-d shard before Lightning calls ``configure_optimizers``."""
    return {unwrapped_name(name): param.ndim for name, param in model.named_parameters()}


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None,
                 ndims: dict[str, int] | None = None) -> list[dict]:
    """timm's parameter groups, decided by name: no weight decay on 1-d parameters (norms, biases) and on the
    model's ``no_weight_decay()``; with ``layer_decay``, ``lr_scale = layer_decay ** (depth + 1 - layer id)``
    per :func:`vit_layer_id` (timm's ``param_groups_layer_decay``). Without it the groups are timm's
    ``param_groups_weight_decay`` (no-decay group first). ``ndims``: the dimensions recorded before wrapping
    (:func:`parameter_ndims`); without them the parameters' current shapes are read."""
    depth = len(model.blocks) if layer_decay is not None else 0
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    if layer_decay is None:  # timm's order: the exempt group, then the decayed one
        groups = {(0, False): {"params": [], "weight_decay": 0.0}, (0, True): {"params": [], "weight_decay": weight_decay}}
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = unwrapped_name(raw_name)
        ndim = ndims.get(name, param.ndim) if ndims is not None else param.ndim
        decayed = ndim > 1 and not name.endswith(".bias") and name not in skip
        if layer_decay is None:
            groups[(0, decayed and bool(weight_decay))]["params"].append(param)
            continue
        layer = vit_layer_id(name, depth)
        group = groups.setdefault((layer, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer)})
        group["params"].append(param)
    return [group for group in groups.values() if group["params"]]


def parameters_on_cuda(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "cuda"


class RecipeCosineScheduler(CosineLRScheduler):
    """timm's cosine schedule, rebuilt from the run's config on resume instead of restored from the checkpoint.

    The schedule is a function of the update count and of the config (lr, warmup, length): a resumed run with a
    larger ``trainer.max_epochs`` continues on the longer cosine, as timm's train script does, instead of the old
    one's ``min_lr`` tail (:meth:`RecipeTrainedModule.on_train_start` says what changed).
    """

    def load_state_dict(self, state_dict: dict) -> None:
        pass


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
    # SimMIM's main_simmim.py / main_finetune.py scale warmup_lr and min_lr by global batch / 512 like the lr;
    # DeiT's main.py scales only the lr
    scale_warmup_and_min_lr: bool = False

    def lr(self, global_batch: int) -> float:
        return self.base_lr * global_batch / self.reference_batch

    def bounds(self, global_batch: int) -> tuple[float, float]:
        """(warmup start lr, final lr) for ``global_batch``."""
        scale = global_batch / self.reference_batch if self.scale_warmup_and_min_lr else 1.0
        return self.warmup_lr * scale, self.min_lr * scale

    def check(self, global_batch: int) -> None:
        peak = self.lr(global_batch)
        for option, value in zip(("warmup_lr", "min_lr"), self.bounds(global_batch)):
            if value > peak:
                raise ConfigError(
                    f"optim.{option}={value:.3g} is above the peak lr {peak:.3g} (optim.base_lr={self.base_lr:g} x "
                    f"global batch {global_batch} / optim.reference_batch={self.reference_batch}), so the schedule "
                    f"would rise: lower optim.{option} or raise optim.base_lr or the batch size")

    def kernel_options(self, model: nn.Module, clipped_under_amp: bool = False) -> dict:
        """torch's AdamW/Adam step: one fused kernel on CUDA, multi-tensor (foreach) elsewhere; same math.

        ``clipped_under_amp``: gradients are clipped under a mixed-precision plugin (``16-mixed``/``bf16-mixed``
        with ``trainer.gradient_clip_val``). Lightning refuses to clip for an optimizer that unscales inside its
        step, as the fused one does, so that case takes foreach on CUDA too."""
        if self.name.lower() not in ("adamw", "adam"):
            return {}
        return {"fused": True} if parameters_on_cuda(model) and not clipped_under_amp else {"foreach": True}

    def build(self, model: nn.Module, global_batch: int, total_steps: int, steps_per_epoch: int,
              ndims: dict[str, int] | None = None, clipped_under_amp: bool = False, extra: nn.Module | None = None):
        """``ndims``: the parameters' dimensions recorded before a strategy wrapped ``model``
        (:func:`parameter_ndims`), which decide the weight-decay groups; ``clipped_under_amp``: see
        :meth:`kernel_options`; ``extra``: more trained parameters (a distillation method's projector), in groups
        of their own (weight decay on matrices as timm's, the lr unscaled by ``layer_decay``)."""
        self.check(global_batch)
        if self.layer_decay is not None and not hasattr(model, "blocks"):
            raise ConfigError(f"optim.layer_decay={self.layer_decay} needs a ViT/DeiT (blocks.<k>), got "
                              f"{type(model).__name__}: set optim.layer_decay=null")
        params = param_groups(model, self.weight_decay, self.layer_decay, ndims)
        if extra is not None:
            params += param_groups(extra, self.weight_decay)
        optimizer = create_optimizer_v2(
            params, opt=self.name, lr=self.lr(global_batch), weight_decay=self.weight_decay,
            betas=tuple(self.betas), eps=self.eps, **self.kernel_options(model, clipped_under_amp),
        )
        warmup_lr, min_lr = self.bounds(global_batch)
        warmup_steps = min(int(round(self.warmup_epochs * steps_per_epoch)), max(total_steps - 1, 0))
        scheduler = RecipeCosineScheduler(
            optimizer,
            t_initial=max(total_steps - warmup_steps, 1),
            lr_min=min_lr,
            warmup_t=warmup_steps,
            warmup_lr_init=warmup_lr,
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

    def trained_parts(self) -> nn.Module | None:
        """Trained parameters beside ``self.<optimized_attr>`` (a distillation method's projector); None: none."""
        return None

    def global_batch_size(self) -> int:
        per_device = self.trainer.datamodule.batch_size
        return per_device * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def configure_optimizers(self):
        total_steps = int(self.trainer.estimated_stepping_batches)
        self.schedule_shape = self.updates_per_epoch()
        steps_per_epoch = self.schedule_shape["updates_per_epoch"]
        global_batch = self.global_batch_size()
        optimizer, scheduler = self.optim.build(getattr(self, self.optimized_attr), global_batch, total_steps,
                                                steps_per_epoch, ndims=getattr(self, "_parameter_ndims", None),
                                                clipped_under_amp=self.clips_under_amp(),
                                                extra=self.trained_parts())
        self.schedule_shape["total_steps"] = total_steps
        self.hparams_resolved = {"optim/global_batch": global_batch, "optim/lr": self.optim.lr(global_batch),
                                 "optim/total_steps": total_steps, "optim/steps_per_epoch": steps_per_epoch}
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def clips_under_amp(self) -> bool:
        """Whether Lightning clips gradients through a mixed-precision plugin (fp16 with its GradScaler, bf16)."""
        return bool(self.trainer.gradient_clip_val) and isinstance(self.trainer.precision_plugin, MixedPrecision)

    def setup(self, stage: str) -> None:
        # Lightning calls setup before the strategy wraps the module and configure_optimizers after
        self._parameter_ndims = parameter_ndims(getattr(self, self.optimized_attr))

    def updates_per_epoch(self) -> dict[str, int]:
        """Optimizer updates per epoch from the loader's batches and the accumulation (as Lightning steps them),
        not ``total_steps // max_epochs``: a run bounded by ``trainer.max_steps`` keeps its epochs' length."""
        trainer = self.trainer
        if trainer.train_dataloader is None:  # max_epochs=null with max_steps: Lightning did not load it
            trainer.fit_loop.setup_data()
        batches = trainer.num_training_batches
        if batches == float("inf"):
            raise ConfigError("optim.warmup_epochs needs epochs of known length, but the training loader has no "
                              "length: give the dataset a __len__ or train with optim.warmup_epochs=0")
        accumulate = trainer.accumulate_grad_batches
        return {"batches_per_epoch": int(batches), "accumulate_grad_batches": accumulate,
                "world_size": trainer.world_size, "updates_per_epoch": max(math.ceil(batches / accumulate), 1)}

    def schedule_position(self) -> int:
        """Updates done in this run's schedule: the run's own ``global_step``, shifted after a resume whose
        updates per epoch differ (:meth:`on_train_start`)."""
        return self.global_step + getattr(self, "_schedule_offset", 0)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        scheduler.step_update(num_updates=self.schedule_position())

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        shape = getattr(self, "schedule_shape", None)
        if shape is not None:
            checkpoint["schedule_shape"] = {**shape, "position": self.schedule_position()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resumed_shape = checkpoint.get("schedule_shape")
        self._resumed_step = checkpoint.get("global_step", 0)

    def on_train_start(self) -> None:
        resumed = getattr(self, "_resumed_shape", None)
        if resumed is not None:
            self._place_resumed_schedule(resumed)
        # a resumed run's optimizer carries the checkpoint's last lr; its first step takes this run's schedule
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.step_update(num_updates=self.schedule_position())

    def _place_resumed_schedule(self, old: dict) -> None:
        """As timm's train.py resumes: position = completed epochs x this run's updates per epoch + the update
        within the epoch, so that another world size, accumulation or epoch length (a requeue on another
        allocation) keeps every epoch at its lr of this run's schedule; one line says what changed."""
        new = self.schedule_shape
        old_position = old.get("position", self._resumed_step)
        epochs, within = divmod(old_position, max(old["updates_per_epoch"], 1))
        position = epochs * new["updates_per_epoch"] + min(within, new["updates_per_epoch"])
        self._schedule_offset = position - self.global_step
        names = {"world_size": "world size", "accumulate_grad_batches": "accumulation",
                 "batches_per_epoch": "batches per epoch", "updates_per_epoch": "optimizer updates per epoch",
                 "total_steps": "optimizer updates in all"}
        changed = [f"{name} {old[key]} -> {new[key]}" for key, name in names.items()
                   if key in old and old[key] != new[key]]
        if changed:
            log.info("lr schedule on resume: %s; the lr continues at update %d of %d (epoch %d%s) of this run's "
                     "schedule", ", ".join(changed), position, new["total_steps"], epochs,
                     f", update {within} within it" if within else "")

    def parameter_counts(self) -> dict[str, int]:
        model = getattr(self, self.optimized_attr)
        return {f"params/{self.optimized_attr}": sum(p.numel() for p in model.parameters()),
                f"params/{self.optimized_attr}_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    def on_fit_start(self) -> None:
        self.param_counts = self.parameter_counts()
        for logger in self.loggers:
            logger.log_hyperparams({**self.param_counts, **getattr(self, "hparams_resolved", {})})
