"""The optimisers beyond AdamW (LAMB for DeiT III, SGD for transfer fine-tuning), the unscaled lr, and the
deit3_* / deit_small_transfer experiments built from their configs."""
from __future__ import annotations

import csv

import pytest
import timm.optim
import torch
from hydra.utils import instantiate

from conftest import FAST_DIGITS, compose_config, cosine_lr, run_cli_in_process
from deit_train.errors import ConfigError
from deit_train.losses import BinaryCrossEntropyLabels
from deit_train.models import create_deit
from deit_train.modules import OptimRecipe


def _model():
    return create_deit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_classes=10)


def _recipe(tmp_path, *overrides) -> OptimRecipe:
    return instantiate(compose_config(list(overrides), tmp_path).optim)


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_first_step_is_momentum_sgd_by_hand(tmp_path, nesterov):
    recipe = _recipe(tmp_path, "optim=sgd", f"optim.nesterov={nesterov}", "optim.warmup_epochs=0")
    weight = torch.nn.Parameter(torch.tensor([[1.0, -2.0]]))
    bias = torch.nn.Parameter(torch.tensor([0.5]))
    layer = torch.nn.Linear(2, 1)
    layer.weight, layer.bias = weight, bias
    optimizer, _ = recipe.build(layer, global_batch=768, total_steps=10, steps_per_epoch=5)
    assert type(optimizer) is torch.optim.SGD
    lr, wd, momentum = 0.01, 1e-4, 0.9  # optim/sgd.yaml at its reference batch 768
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([lr, lr])
    for _ in range(2):  # two steps: the second uses the momentum buffer
        optimizer.zero_grad()
        (layer(torch.tensor([[1.0, 1.0]])) ** 2).sum().backward()
        optimizer.step()
    # by hand: out = w.x + b = -0.5; d out^2/dw = 2 out x, d/db = 2 out; weight decay on the weight, not the bias
    w, b = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5
    buf_w, buf_b = None, None
    for _ in range(2):
        out = w.sum() + b
        grad_w, grad_b = 2 * out * torch.ones(2, dtype=torch.float64) + wd * w, 2 * out
        buf_w = grad_w if buf_w is None else momentum * buf_w + grad_w
        buf_b = grad_b if buf_b is None else momentum * buf_b + grad_b
        step_w = grad_w + momentum * buf_w if nesterov else buf_w
        step_b = grad_b + momentum * buf_b if nesterov else buf_b
        w, b = w - lr * step_w, b - lr * step_b
    assert torch.allclose(weight.detach().double()[0], w, atol=1e-7)
    assert bias.item() == pytest.approx(float(b), abs=1e-7)


def test_lamb_is_timms_with_the_lr_as_given(tmp_path):
    recipe = _recipe(tmp_path, "optim=lamb", "optim.warmup_epochs=0", "optim.base_lr=4e-3")
    for global_batch in (64, 2048):  # --unscale-lr: the batch does not move the lr
        assert recipe.lr(global_batch) == 4e-3
        optimizer, scheduler = recipe.build(_model(), global_batch, total_steps=100, steps_per_epoch=10)
        scheduler.step_update(num_updates=0)
        assert isinstance(optimizer, timm.optim.Lamb)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([4e-3] * len(optimizer.param_groups))
        assert {g["betas"] for g in optimizer.param_groups} == {(0.9, 0.999)}
        assert {g["eps"] for g in optimizer.param_groups} == {1e-8}
    # AdamW with scale_lr=false: the same lr on every batch, the scaled one otherwise
    assert _recipe(tmp_path, "optim.scale_lr=false").lr(2048) == 5e-4
    assert _recipe(tmp_path).lr(2048) == pytest.approx(2e-3)


def test_bad_optimiser_options_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^optim.name=rmsprop is not one of adamw, adam, lamb, sgd"):
        OptimRecipe(name="rmsprop")
    with pytest.raises(ConfigError, match=r"^optim.scale_warmup_and_min_lr=true scales warmup_lr and min_lr"):
        OptimRecipe(scale_lr=False, scale_warmup_and_min_lr=True)
    recipe = OptimRecipe(name="lamb", scale_lr=False, base_lr=1e-6, min_lr=1e-5)
    with pytest.raises(ConfigError, match=r"above the peak lr 1e-06 \(optim.base_lr=1e-06, optim.scale_lr=false\)"):
        recipe.build(_model(), 2048, 100, 10)


def test_deit3_small_builds_the_official_recipe(tmp_path):
    cfg = compose_config(["experiment=deit3_small", "data.root=/data"], tmp_path)
    optimizer, scheduler = instantiate(cfg.optim).build(_model(), global_batch=2048, total_steps=8000,
                                                        steps_per_epoch=10)
    assert isinstance(optimizer, timm.optim.Lamb)
    lrs = []
    for step in (0, 50, 8000):
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([1e-6, 4e-3, 1e-5])  # warmup-lr, --lr 4e-3 unscaled at 2048, main.py's --min-lr
    assert (cfg.model.init_values, cfg.model.drop_path_rate, cfg.augment.train_crop) == (1e-4, 0.05, "rrc")
    assert (cfg.augment.auto_augment, cfg.augment.re_prob, cfg.augment.label_smoothing) == ("3a", 0.0, 0.0)
    assert isinstance(instantiate(cfg.distill).label_loss, BinaryCrossEntropyLabels)  # --bce-loss
    model = instantiate({**cfg.model, "num_classes": 1000})
    assert torch.equal(model.blocks[0].ls1.gamma, torch.full((384,), 1e-4))  # LayerScale at DeiT III's init
    base = compose_config(["experiment=deit3_base", "data.root=/data"], tmp_path)
    assert (base.model.image_size, base.model.drop_path_rate, base.optim.base_lr) == (192, 0.2, 3e-3)


def test_deit_small_transfer_fine_tunes_with_sgd(tmp_path):
    cfg = compose_config(["experiment=deit_small_transfer", "data.root=/data", "model.init_from=/x.pth"], tmp_path)
    recipe = instantiate(cfg.optim)
    optimizer, _ = recipe.build(_model(), global_batch=768, total_steps=100, steps_per_epoch=10)
    assert type(optimizer) is torch.optim.SGD and optimizer.defaults["nesterov"] is True
    assert recipe.lr(768) == pytest.approx(0.01) and optimizer.defaults["momentum"] == 0.9
    assert (cfg.model.drop_path_rate, cfg.augment.re_prob, cfg.data.num_classes) == (0.0, 0.0, 10)


def test_a_run_with_sgd_trains_on_its_lr(tmp_path, digits_teacher_file):
    proc = run_cli_in_process(["experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}",
                               "teacher.min_val_top1=0", "trainer.max_epochs=1", *FAST_DIGITS, "optim=sgd",
                               "optim.base_lr=0.01", "optim.warmup_epochs=0", "optim.min_lr=0",
                               "trainer.log_every_n_steps=1"],
                              tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "run" / "csv" / "metrics.csv") as handle:
        lrs = [float(row["train/lr"]) for row in csv.DictReader(handle) if row.get("train/lr")]
    peak = 0.01 * 16 / 768  # base_lr x global batch 16 / reference_batch 768; logged after each of the 4 updates
    assert lrs == pytest.approx([cosine_lr(update, 4, 0, peak, 0.0, 0.0) for update in range(1, 5)], abs=1e-9)
