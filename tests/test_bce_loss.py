"""loss=bce, DeiT III's --bce-loss: the binarised Mixup/CutMix target and the loss against the official formula
(engine.py: targets.gt(0.0) after Mixup; main.py: torch.nn.BCEWithLogitsLoss()), written out independently in
float64; the combinations it cannot serve; and a run with it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from timm.data import Mixup

from conftest import FAST_DIGITS, compose_config, run_cli_in_process
from deit_train.errors import ConfigError
from deit_train.losses import BinaryCrossEntropyLabels, DeiTDistillation, StudentOutputs, TeacherOutputs


def official_bce(logits: torch.Tensor, mixed_target: torch.Tensor) -> float:
    """The official --bce-loss on a Mixup target, by its definition, element by element in float64 Python:
    t = 1 if target > 0 else 0; mean over batch x classes of -(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z)))."""
    total, count = 0.0, 0
    for row_z, row_t in zip(logits.tolist(), mixed_target.tolist()):
        for z, t in zip(row_z, row_t):
            positive = 1.0 if t > 0.0 else 0.0
            sigmoid = 1.0 / (1.0 + math.exp(-z))
            total -= positive * math.log(sigmoid) + (1.0 - positive) * math.log(1.0 - sigmoid)
            count += 1
    return total / count


def _mixed_batch(seed: int, batch: int = 8, classes: int = 10, **mixup):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 8, 8, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    torch.manual_seed(seed)  # timm's Mixup draws lambda and the box from numpy
    np.random.seed(seed)
    mixer = Mixup(num_classes=classes, label_smoothing=0.0, **mixup)
    return labels, mixer(images, labels)[1]


@pytest.mark.parametrize("seed,mixup", [(0, {"mixup_alpha": 0.8, "cutmix_alpha": 0.0}),
                                        (1, {"mixup_alpha": 0.0, "cutmix_alpha": 1.0}),
                                        (2, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mode": "elem"})])
def test_bce_target_and_loss_are_the_official_formula(seed, mixup):
    labels, mixed = _mixed_batch(seed, **mixup)
    loss_fn = BinaryCrossEntropyLabels()
    binary = loss_fn.binary_target(mixed, 10)
    # every class of the mixed image is a positive: the label and the one of the flipped batch it was mixed with
    flipped = labels.flip(0)
    for row, (a, b), weights in zip(binary, zip(labels.tolist(), flipped.tolist()), mixed):
        expected = {a, b} if float(weights[b]) > 0 else {a}
        assert set(torch.nonzero(row).flatten().tolist()) == expected
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(seed + 10), dtype=torch.float64) * 3
    assert loss_fn(logits, mixed.double()).item() == pytest.approx(official_bce(logits, mixed), rel=1e-6, abs=1e-6)


def test_class_indices_are_their_one_hot_target():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    one_hot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    assert BinaryCrossEntropyLabels()(logits, labels).item() == pytest.approx(official_bce(logits, one_hot), rel=1e-6)


def test_distillation_keeps_its_teacher_term_with_bce_labels():
    cls, dist = torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    teacher, labels = torch.tensor([[0.0, 0.0, 3.0]]), torch.tensor([0])
    method = DeiTDistillation("hard", alpha=0.5, label_loss=BinaryCrossEntropyLabels())
    terms = method.terms(StudentOutputs(cls, dist), labels, TeacherOutputs(teacher))
    bce = official_bce(cls.double(), torch.tensor([[1.0, 0.0, 0.0]]))
    ce_to_teacher = math.log(2 + math.e)  # CE([0, 1, 0], class 2) = log(e^0 + e^1 + e^0) - 0
    assert terms["labels"].item() == pytest.approx(0.5 * bce, rel=1e-6)
    assert terms["teacher"].item() == pytest.approx(0.5 * ce_to_teacher, rel=1e-6)


def test_label_smoothing_is_refused_in_one_line(tmp_path):
    # before anything trains: the quickstart's teacher (not cached in this empty cache) is not bootstrapped
    proc = run_cli_in_process(["experiment=quickstart", "loss=bce", "loss.label_smoothing=0.1", *FAST_DIGITS],
                              tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: loss=bce with loss.label_smoothing=0.1: the official --bce-loss binarises the targets")
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "teacher").exists()
    # smoothed Mixup targets (augment.label_smoothing set apart from the loss's) stop on the first batch
    mixer = Mixup(mixup_alpha=0.8, num_classes=10, label_smoothing=0.1)
    _, smoothed = mixer(torch.randn(4, 3, 8, 8), torch.arange(4))
    with pytest.raises(ConfigError, match="^loss=bce: the Mixup/CutMix targets carry label smoothing"):
        BinaryCrossEntropyLabels()(torch.zeros(4, 10), smoothed)
    # with loss=bce the augment recipes' Mixup gets no smoothing
    assert compose_config(["loss=bce", "augment=deit"], tmp_path).augment.label_smoothing == 0.0


def test_a_distilled_run_trains_with_bce(tmp_path, digits_teacher_file):
    proc = run_cli_in_process(["experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}",
                               "teacher.min_val_top1=0", "trainer.max_epochs=1", *FAST_DIGITS, "loss=bce"],
                              tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / ".hydra" / "config.yaml").read_text().count("BinaryCrossEntropyLabels") == 1
