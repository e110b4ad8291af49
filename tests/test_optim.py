"""The DeiT optimisation recipe: scaled lr, weight-decay exemptions, warmup + cosine per step."""
import math

import pytest
import torch
from hydra.utils import instantiate

from conftest import compose_config
from deit_train.errors import ConfigError
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


@pytest.mark.parametrize("option,value", [("min_lr", 5e-6), ("warmup_lr", 3e-6)])
def test_a_floor_above_the_peak_lr_is_one_line_naming_option_and_peak(option, value):
    # the old deit_base_384_finetune on 32 x 8 GPUs: peak 5e-6 x 256 / 512 = 2.5e-6, below min_lr 5e-6
    recipe = OptimRecipe(base_lr=5e-6, **{"min_lr": 1e-7, "warmup_lr": 1e-7, option: value})
    with pytest.raises(ConfigError, match=rf"^optim.{option}=[0-9.e-]+ is above the peak lr 2.5e-06 \(optim.base_lr=5e-06 "
                                          r"x global batch 256 / optim.reference_batch=512\)") as error:
        recipe.build(_model(), global_batch=256, total_steps=100, steps_per_epoch=10)
    assert "\n" not in str(error.value)
    recipe.build(_model(), global_batch=512, total_steps=100, steps_per_epoch=10)  # peak 5e-6: allowed


def test_simmim_scaling_puts_warmup_and_final_lr_on_the_global_batch():
    # main_simmim.py: BASE_LR, WARMUP_LR and MIN_LR all x batch x world size / 512
    recipe = OptimRecipe(base_lr=1e-4, warmup_lr=5e-7, min_lr=5e-6, warmup_epochs=1, scale_warmup_and_min_lr=True)
    optimizer, scheduler = recipe.build(_model(), global_batch=2048, total_steps=50, steps_per_epoch=10)
    lrs = []
    for step in (0, 10, 50):
        scheduler.step_update(num_updates=step)
        lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs == pytest.approx([5e-7 * 4, 1e-4 * 4, 5e-6 * 4])
    unscaled = OptimRecipe(base_lr=1e-4, warmup_lr=5e-7, min_lr=5e-6, warmup_epochs=1)  # DeiT: only the peak scales
    optimizer, scheduler = unscaled.build(_model(), global_batch=2048, total_steps=50, steps_per_epoch=10)
    scheduler.step_update(num_updates=50)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-6)


def test_384_preset_keeps_a_constant_lr_after_warmup_on_any_global_batch(tmp_path):
    cfg = compose_config(["experiment=deit_base_384_finetune", "data.root=/data", "model.init_from=/x.ckpt"], tmp_path)
    recipe = instantiate(cfg.optim)
    for global_batch in (256, 512):
        optimizer, scheduler = recipe.build(_model(), global_batch, total_steps=300, steps_per_epoch=10)
        peak = 5e-6 * global_batch / 512
        for step in (50, 175, 300):  # after the 5 warmup epochs
            scheduler.step_update(num_updates=step)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(peak)


def test_layer_scale_and_mean_pooling_are_timms():
    model = create_deit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        num_classes=10, init_values=0.1, global_pool="avg")
    assert torch.equal(model.blocks[1].ls1.gamma, torch.full((32,), 0.1))
    features = model.forward_features(torch.randn(2, 3, 32, 32))
    expected = model.head(model.fc_norm(features[:, model.num_prefix_tokens:].mean(dim=1)))
    assert torch.allclose(model.forward_head(features), expected)
    with pytest.raises(ConfigError, match="model.global_pool=avg does not apply to a distilled student"):
        create_deit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    distilled=True, global_pool="avg")
