"""Train-step throughput of the distillation LightningModule vs a plain PyTorch loop doing the same math.

Same timm student (DeiT with distillation token) and frozen timm teacher, same hard-distillation loss,
same timm AdamW + per-step cosine schedule, same batches, same process; the two loops alternate
``--repeats`` times and the median of each is compared.

    python scripts/benchmark_step.py                       # DeiT-Ti/16 @224, RegNetX-200MF teacher, batch 16
    python scripts/benchmark_step.py --image-size 112 --steps 40 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import lightning as L
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from deit_train.losses import CrossEntropyLabels, DeiTDistillation, StudentOutputs, TeacherOutputs
from deit_train.models import create_deit, forward_heads
from deit_train.teacher import FrozenTeacher
from deit_train.modules import ClassificationModule, OptimRecipe


class _Batches(L.LightningDataModule):
    """Fixed random batches, shared by both loops."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.dataset = TensorDataset(images, labels)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=self.batch_size, shuffle=False, drop_last=True)


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()


def plain_loop(student, teacher, criterion, recipe, data: _Batches, steps: int, warmup: int) -> float:
    optimizer, scheduler = recipe.build(student, data.batch_size, steps, steps)
    student.train()
    start = 0.0
    for step, (images, target) in enumerate(data.train_dataloader()):
        if step == warmup:
            start = time.perf_counter()
        teacher_logits = teacher(images)
        cls, dist = forward_heads(student, images)
        loss = criterion(StudentOutputs(cls, dist), target, TeacherOutputs(teacher_logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step_update(num_updates=step + 1)
    return (steps - warmup) * data.batch_size / (time.perf_counter() - start)


def lightning_loop(student, teacher, criterion, recipe, data: _Batches, steps: int, warmup: int) -> float:
    timer = _StepTimer(warmup)
    module = ClassificationModule(student, criterion, recipe, teacher=teacher)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[timer],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=data)
    return (steps - warmup) * data.batch_size / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--teacher", default="regnetx_002")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    torch.manual_seed(0)
    student0 = create_deit(image_size=args.image_size, num_classes=100, distilled=True)
    with tempfile.TemporaryDirectory() as tmp:  # the teacher loads from a file, as in a real run
        path = f"{tmp}/teacher.pth"
        torch.save(timm.create_model(args.teacher, num_classes=100).state_dict(), path)
        teacher_net = FrozenTeacher(args.teacher, checkpoint=path)
    n = args.steps * args.batch_size
    data = _Batches(torch.randn(n, 3, args.image_size, args.image_size), torch.randint(0, 100, (n,)),
                    args.batch_size)
    criterion = DeiTDistillation("hard", label_loss=CrossEntropyLabels(label_smoothing=0.1))
    recipe = OptimRecipe(warmup_epochs=0.2)

    plain, lightning = [], []
    for _ in range(args.repeats):
        plain.append(plain_loop(copy.deepcopy(student0), teacher_net, criterion, recipe, data, args.steps, args.warmup))
        lightning.append(lightning_loop(copy.deepcopy(student0), teacher_net, criterion, recipe, data, args.steps,
                                        args.warmup))
    result = {
        "setup": f"DeiT-Ti/16 distilled @{args.image_size}, teacher {args.teacher}, batch {args.batch_size}, "
                 f"{args.steps - args.warmup} timed steps x {args.repeats}, {torch.get_num_threads()} threads",
        "plain_img_s": round(statistics.median(plain), 2),
        "lightning_img_s": round(statistics.median(lightning), 2),
    }
    result["ratio"] = round(result["lightning_img_s"] / result["plain_img_s"], 3)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
