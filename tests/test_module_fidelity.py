"""The classification module against the official DeiT engine: EMA per optimizer step, val/ce, honest results."""
from itertools import islice
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate

from conftest import FAST_DIGITS, compose_config
from deit_train.losses import StudentOutputs, TeacherOutputs
from deit_train.train import split_honesty


def _module_and_data(tmp_path, *overrides):
    cfg = compose_config(["experiment=quickstart", *FAST_DIGITS, *overrides], tmp_path)
    return instantiate(cfg.module), instantiate(cfg.data)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def test_ema_updates_once_per_optimizer_step_with_gradient_accumulation(tmp_path):
    module, data = _module_and_data(tmp_path, "distill=none", "~teacher", "teacher_recipe=null",
                                    "module.ema_decay=0.5")
    steps = []
    update = module.ema.update
    module.ema.update = lambda model, step=None: (steps.append(step), update(model, step=step))
    _trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=0, accumulate_grad_batches=2).fit(module, data)
    assert module.global_step == 2
    assert steps == [1, 2]  # 4 micro-batches, 2 optimizer steps: 2 EMA updates (the official engine's count)


def test_val_ce_is_the_plain_cross_entropy_of_the_averaged_prediction(tmp_path, digits_teacher_file):
    module, data = _module_and_data(tmp_path, f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0")
    metrics = _trainer(limit_val_batches=2).validate(module, data, verbose=False)[0]
    module.eval()
    with torch.no_grad():
        batches = list(islice(iter(data.val_dataloader()), 2))
        features = [module.student.forward_features(images) for images, _ in batches]
        averaged = torch.cat([(module.student.head(f[:, 0]) + module.student.head_dist(f[:, 1])) / 2 for f in features])
        target = torch.cat([t for _, t in batches])
    assert metrics["val/ce"] == pytest.approx(F.cross_entropy(averaged, target).item(), rel=1e-5)
    # the criterion on val (label smoothing, the distillation head against the teacher) is another number
    assert metrics["val/loss"] != pytest.approx(metrics["val/ce"], rel=1e-3)


def test_results_say_when_the_test_split_is_the_validation_split():
    shared = object()
    imagenet = split_honesty(SimpleNamespace(val_set=shared, test_set=shared))
    assert imagenet["test_split_is_val"] is True and "optimistic" in imagenet["test_note"]
    assert split_honesty(SimpleNamespace(val_set=object(), test_set=object())) == {"test_split_is_val": False}
    hf = SimpleNamespace(splits={"train": "train", "val": "validation", "test": "validation"}, val_set=1, test_set=2)
    assert split_honesty(hf)["test_split_is_val"] is True


def test_soft_paper_preset_is_the_official_loss_with_tau_3_and_alpha_0_1(tmp_path):
    criterion = instantiate(compose_config(["experiment=quickstart", "distill=soft_paper"], tmp_path).distill)
    torch.manual_seed(0)
    cls, dist, teacher = torch.randn(3, 4, 10).unbind(0)
    target = torch.tensor([1, 2, 3, 4])
    # official losses.py: kl_div(sum, log_target) x T^2 / outputs.numel(); base: label smoothing 0.1 (deit recipe)
    kl = F.kl_div(F.log_softmax(dist / 3, dim=1), F.log_softmax(teacher / 3, dim=1), reduction="sum",
                  log_target=True) * 9 / dist.numel()
    expected = 0.9 * F.cross_entropy(cls, target, label_smoothing=0.1) + 0.1 * kl
    assert criterion(StudentOutputs(cls, dist), target, TeacherOutputs(teacher)).item() == pytest.approx(
        expected.item(), rel=1e-6)
