"""LightningModule for DeiT classification and distillation (the paper's two fine-tuning modes).

- CLS head only: a student without distillation token, ``distill=none``, no teacher.
- CLS + distillation head: a distilled student with a frozen teacher; the class head learns from the
  labels, the distillation head from the teacher on the same augmented images; prediction = mean of heads.
- "Usual distillation" (paper Tab. 3): a student without distillation token and a teacher; the class head
  learns from both (see :mod:`deit_train.losses.deit`).

The loss is a distillation method (:mod:`deit_train.losses.base`): the module computes what the method needs from
the student and the teacher, sums the method's terms and logs each; the method also says how the student predicts.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from deit_train.errors import ConfigError
from deit_train.losses import DistillationMethod, StudentOutputs, TeacherOutputs
from deit_train.models.deit import forward_student, is_distilled
from deit_train.teacher.network import FrozenTeacher
from deit_train.modules.finite import check_finite
from deit_train.modules.metrics import EvalMetrics
from deit_train.modules.optim import OptimRecipe, RecipeTrainedModule


_EMA_PREFIX = "ema."  # the EMA's keys in a checkpoint's state dict, beside ``student.``


def _frozen_ema(student: nn.Module, decay: float) -> ModelEmaV3:
    # float32 whatever the student's precision: a bf16/fp16 copy (trainer.precision=bf16-true/16-true) cannot hold
    # an update of (1 - decay) = 4e-5 of its value (bf16 resolves ~4e-3)
    ema = ModelEmaV3(student, decay=decay, dtype=torch.float32)
    ema.requires_grad_(False)  # the deepcopy keeps requires_grad; nothing back-propagates into the average
    return ema


class ClassificationModule(RecipeTrainedModule):
    """Trains ``student`` with ``criterion`` (a distillation method); ``teacher`` (frozen) only when the method
    reads one.

    Args:
        mixup: a callable ``(images, targets) -> (images, soft_targets)`` such as ``timm.data.Mixup``;
            the teacher then sees the mixed images.
        ema_decay: keep a timm EMA of the student and evaluate it too (``val/top1_ema``).
        compile: ``torch.compile`` the student's forward (the student module itself stays eager, so its
            state-dict keys, EMA copy and exports are those of the plain network).
    """

    def __init__(
        self,
        student: nn.Module,
        criterion: DistillationMethod,
        optim: OptimRecipe,
        teacher: FrozenTeacher | None = None,
        mixup=None,
        ema_decay: float | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self._check(student, criterion, teacher)
        criterion.bind(student, teacher if criterion.uses_teacher else None)  # its trainable parts (a projector)
        self.student = student
        # The frozen teacher is not a registered submodule (timm's distillation wraps only the student): DDP/FSDP
        # never broadcast or shard it, precision plugins never cast it, checkpoints never store it (it has its own
        # file); it places itself on the device in its own precision (setup, or its first forward).
        object.__setattr__(self, "teacher", teacher if criterion.uses_teacher else None)
        self.forward_student = torch.compile(forward_student) if compile else forward_student
        self._teacher_hits = torch.zeros(2)  # (correct, seen) of the teacher during the sanity check
        self.criterion = criterion
        self.optim = optim
        self.mixup = mixup
        # The EMA copy is not a registered submodule either (timm's train.py keeps it outside DDP): wrapped with the
        # student, its parameters would be gradients DDP waits for and never gets. It is frozen, placed on the
        # device in setup, and stored in / restored from the checkpoint's state dict as ``ema.*`` by the hooks below.
        object.__setattr__(self, "ema", _frozen_ema(student, ema_decay) if ema_decay else None)
        num_classes = student.num_classes
        self.metrics = nn.ModuleDict({
            stage: EvalMetrics(stage, num_classes, is_distilled(student), self.teacher is not None)
            for stage in ("val", "test")
        })
        if self.ema is not None:
            self.ema_metrics = EvalMetrics("val_ema", num_classes, is_distilled(student), False)
        self._batch_started = 0.0
        self.teacher_cache = None  # a TeacherLogitCache (teacher.cache_dir) stands in for the teacher in training
        self._ema_step = 0

    @staticmethod
    def _check(student: nn.Module, criterion: DistillationMethod, teacher: FrozenTeacher | None) -> None:
        kind = criterion.distill_type
        if criterion.uses_teacher and teacher is None:
            raise ConfigError(f"distill={kind} needs a teacher: add teacher=<name> (e.g. teacher=regnety_160 "
                              "teacher.checkpoint=/path/regnety_160.pth) or use distill=none")
        criterion.check(student, teacher if criterion.uses_teacher else None)
        if teacher is not None and criterion.uses_teacher and teacher.num_classes != student.num_classes:
            raise ConfigError(f"the teacher predicts {teacher.num_classes} classes but the data has "
                              f"{student.num_classes}: use a teacher trained on this data set (teacher.checkpoint=...)")

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.ema is not None:
            self.ema.to(self.trainer.strategy.root_device)
        if self.teacher is not None:  # fail before training on a precision the device lacks or other classes
            self.teacher.prepare(self.trainer.strategy.root_device)
            self.teacher.match_classes(getattr(self.trainer.datamodule, "classes", None))

    def forward(self, images: Tensor) -> Tensor:
        """The prediction, as the method makes it (DeiT: class logits, averaged with the distillation head)."""
        return self.criterion.predict(self.student_outputs(self.student, images))

    def student_outputs(self, student: nn.Module, images: Tensor) -> StudentOutputs:
        """The student's heads on ``images`` (``student``: the trained network or its EMA), and its pooled
        features when the method reads them."""
        cls, dist, features = self.forward_student(student, images, "features" in self.criterion.student_needs)
        return StudentOutputs(cls=cls, dist=dist, features=features)

    def teacher_outputs(self, images: Tensor, source: nn.Module | None = None) -> TeacherOutputs | None:
        """What the method reads from the teacher on ``images`` (None when it reads nothing); ``source`` stands in
        for the live teacher (the logit cache in training: it serves logits only, :class:`TeacherLogitCache`)."""
        if self.teacher is None:
            return None
        if "features" in self.criterion.teacher_needs:
            logits, features = self.teacher(images, features=True)
            return TeacherOutputs(logits=logits, features=features)
        return TeacherOutputs(logits=(source if source is not None else self.teacher)(images))

    def trained_parts(self) -> nn.Module | None:
        """The method's trainable parts (a projector), trained beside the student; None when it has none."""
        return self.criterion if any(p.requires_grad for p in self.criterion.parameters()) else None

    # ---- the EMA copy in checkpoints --------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)  # the lr schedule's shape (RecipeTrainedModule)
        if self.ema is not None:
            checkpoint["state_dict"].update({f"{_EMA_PREFIX}{k}": v for k, v in self.ema.state_dict().items()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restores the EMA (and takes its keys out of the state dict the student loads strictly from). A checkpoint
        of a run without EMA starts the EMA at its student's weights, as timm's EMA starts at the loaded model."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        ema_state = {k[len(_EMA_PREFIX):]: state.pop(k) for k in [k for k in state if k.startswith(_EMA_PREFIX)]}
        if self.ema is None:
            return
        if not ema_state:
            ema_state = {f"module.{k[len('student.'):]}": v for k, v in state.items() if k.startswith("student.")}
        self.ema.load_state_dict(ema_state)

    # ---- training -------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.criterion.set_epoch(self.current_epoch)  # schedules inside the loss (DKD's warm-up)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, target = batch
        if self.mixup is not None:
            images, target = self.mixup(images, target)
        teacher = self.teacher_outputs(images, self.teacher_cache)
        student = self.student_outputs(self.student, images)
        terms = self.criterion.terms(student, target, teacher)
        loss = sum(terms.values())
        check_finite(self, loss, lambda: {"class head logits": student.cls, "distillation head logits": student.dist,
                                          "teacher logits": teacher.logits if teacher is not None else None})
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        if len(terms) > 1:  # each term per epoch (averaged on the device; no host read per step)
            self.log_dict({f"train/loss_{name}": term.detach() for name, term in terms.items()}, on_step=False,
                          on_epoch=True, batch_size=len(images))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.ema is not None and self.global_step != self._ema_step:  # once per optimizer step (accumulation)
            self._ema_step = self.global_step
            self.ema.update(self.student, step=self.global_step)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                 rank_zero_only=True)

    # ---- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, metrics: EvalMetrics, student: nn.Module, batch, with_loss: bool) -> None:
        images, target = batch
        teacher = self.teacher_outputs(images) if metrics.teacher is not None else None
        teacher_logits = teacher.logits if teacher is not None else None
        outputs = self.student_outputs(student, images)
        cls, dist, prediction = outputs.cls, outputs.dist, self.criterion.predict(outputs)
        metrics.update(target, cls, dist, teacher_logits, prediction)
        if teacher_logits is not None and self.trainer.sanity_checking:
            self._teacher_hits += torch.tensor([(teacher_logits.argmax(-1) == target).sum().item(), len(target)])
        if with_loss:  # _check guarantees the teacher logits and dist head exactly when the criterion distils
            loss = self.criterion(outputs, target, teacher)
            self.log(f"{metrics.stage}/loss", loss, on_epoch=True, batch_size=len(images), sync_dist=True)
            # the official evaluate(): plain cross-entropy of the prediction (heads averaged), beside the criterion
            self.log(f"{metrics.stage}/ce", F.cross_entropy(prediction, target), on_epoch=True,
                     batch_size=len(images), sync_dist=True)
        for name, metric in metrics.loggable().items():
            self.log(name, metric, on_step=False, on_epoch=True, prog_bar=name == f"{metrics.stage}/top1")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(self.metrics["val"], self.student, batch, with_loss=True)
        if self.ema is not None:  # float32 (_frozen_ema), also where a *-true precision made the batch bf16/fp16
            images, target = batch
            self._evaluate(self.ema_metrics, self.ema.module, (images.float(), target), with_loss=False)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking and self._teacher_hits[1] > 0:  # the teacher must know these images
            correct, seen = self.trainer.strategy.reduce(self._teacher_hits.to(self.device), reduce_op="sum").tolist()
            self._teacher_hits.zero_()
            self.teacher.check_val_top1(correct / seen)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(self.metrics["test"], self.student, batch, with_loss=True)

    def parameter_counts(self) -> dict[str, int]:
        teacher = self.teacher.num_parameters if self.teacher is not None else 0
        method = sum(p.numel() for p in self.criterion.parameters() if p.requires_grad)
        return {**super().parameter_counts(), "params/teacher": teacher, "params/method_trainable": method}
