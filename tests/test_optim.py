"""The DeiT optimisation recipe: scaled lr, weight-decay exemptions, warmup + cosine per step."""
import math

import pytest
import torch

from deit_train.models import create_deit
from deit_train.modules import OptimRecipe


def _model():
    return create_deit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_classes=10, distilled=True)


def test_lr_follows_linear_scaling_rule():
    assert OptimRecipe(base_lr=5e-4).lr(1024) == pytest.approx(1e-3)
    assert OptimRecipe(base_lr=5e-4).lr(256) == pytest.approx(2.5e-4)


def test_no_weight_decay_on_norms_biases_pos_embed_and_tokens():
    model = _model()
    optimizer, _ = OptimRecipe().build(model, global_batch=512, total_steps=100, steps_per_epoch=10)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"pos_embed", "cls_token", "dist_token", "norm.weight", "norm.bias", "head.bias"} <= exempt
    assert {"blocks.0.attn.qkv.weight", "head.weight", "head_dist.weight", "patch_embed.proj.weight"} <= decayed
    assert all(g["weight_decay"] in (0.0, 0.05) for g in optimizer.param_groups)
    assert isinstance(optimizer, torch.optim.AdamW)


def test_schedule_warms_up_linearly_then_decays_by_cosine_per_step():
    recipe = OptimRecipe(base_lr=5e-4, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    optimizer, scheduler = recipe.build(_model(), global_batch=512, total_steps=100, steps_per_epoch=10)
    lrs = []
    for step in range(101):
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[10] == pytest.approx(1e-6 + (5e-4 - 1e-6) * 10 / 20)  # halfway through 20 warmup steps
    assert lrs[20] == pytest.approx(5e-4)
    # 80 cosine steps after warmup: at step 60 we are halfway
    assert lrs[60] == pytest.approx(1e-5 + 0.5 * (5e-4 - 1e-5) * (1 + math.cos(math.pi * 0.5)))
    assert lrs[100] == pytest.approx(1e-5)
