"""SimMIM: masking, the masked-pixel loss, the mask token, fine-tuning from the encoder, layer-wise lr decay."""
import json
import re
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from conftest import run_cli_in_process
from deit_train.data.digits import DigitsDataModule
from deit_train.data.simmim import SimMIMTrainTransform
from deit_train.errors import ConfigError
from deit_train.run.plots import loss_per_epoch, plot_loss_curve
from deit_train.models import create_deit, create_timm_classifier, forward_heads
from deit_train.models.simmim import MaskGenerator, SimMIM, masked_l1_loss, pixel_mask
from deit_train.modules.optim import OptimRecipe
from deit_train.modules.simmim import SimMIMModule

TINY = dict(image_size=16, patch_size=4, hidden_size=24, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2.0)


def tiny_encoder(distilled: bool = False, num_classes: int = 0, **overrides):
    torch.manual_seed(0)
    return create_deit(**{**TINY, **overrides}, distilled=distilled, num_classes=num_classes)


# ---- mask generator --------------------------------------------------------------------------------
@pytest.mark.parametrize("image_size, patch, mask_patch, ratio, masked_squares", [
    (224, 16, 32, 0.6, 30),   # ViT-B/16: 7x7 squares, ceil(29.4) = 30, each 2x2 patches
    (192, 4, 32, 0.6, 22),    # SimMIM's Swin setting: 6x6 squares, ceil(21.6) = 22, each 8x8 patches
    (32, 4, 8, 0.6, 10),      # the digits quickstart: 4x4 squares, ceil(9.6) = 10
    (160, 16, 16, 0.07, 7),   # 100 squares x 0.07 is 7.000000000000001 in floating point: still exactly 7
    (64, 8, 32, 0.5, 2),      # 2x2 squares, one mask square = 4x4 patches
])
def test_mask_generator_masks_exactly_ceil_ratio_squares(image_size, patch, mask_patch, ratio, masked_squares):
    generator = MaskGenerator(image_size, patch, mask_patch, ratio)
    masks = generator(5, generator=torch.Generator().manual_seed(1))
    grid, scale = image_size // patch, mask_patch // patch
    assert masks.shape == (5, grid * grid) and masks.dtype == torch.bool
    assert masks.sum(dim=1).tolist() == [masked_squares * scale * scale] * 5
    # each mask square is masked or visible as a whole: max == min inside every scale x scale block
    blocks = masks.view(5, grid // scale, scale, grid // scale, scale).float()
    assert torch.equal(blocks.amax(dim=(2, 4)), blocks.amin(dim=(2, 4)))
    assert blocks.amax(dim=(2, 4)).sum(dim=(1, 2)).tolist() == [masked_squares] * 5


@pytest.mark.parametrize("image_size,patch,mask_patch,hint", [
    (32, 4, 32, "module.mask_patch_size=8 (16 squares)"),  # simmim_pretrain's 32 px squares on 32 px digits
    (32, 16, 32, "a smaller model.patch_size than 16"),
])
def test_a_mask_grid_of_one_square_is_refused(image_size, patch, mask_patch, hint):
    with pytest.raises(ConfigError, match=rf"^module.mask_patch_size={mask_patch} cuts {image_size} px images into 1 "
                                          rf"mask square\(s\), so every image would be masked whole.*{re.escape(hint)}"):
        MaskGenerator(image_size, patch, mask_patch, 0.6)
    assert MaskGenerator(32, 4, 16, 0.6)(2).float().mean() == 0.75  # 2x2 grid: ceil(0.6 x 4) = 3 of 4 squares


def test_mask_generator_is_random_per_image_and_seedable():
    generator = MaskGenerator(224, 16, 32, 0.6)
    a = generator(8, generator=torch.Generator().manual_seed(3))
    b = generator(8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len({tuple(row.tolist()) for row in a}) == 8


@pytest.mark.parametrize("args, option", [((224, 16, 24, 0.6), "mask_patch_size"), ((224, 16, 48, 0.6), "image_size"),
                                          ((224, 16, 32, 1.0), "mask_ratio")])
def test_mask_generator_rejects_bad_settings(args, option):
    with pytest.raises(ConfigError, match=option):
        MaskGenerator(*args)


# ---- loss ------------------------------------------------------------------------------------------
def test_masked_l1_is_zero_for_a_perfect_reconstruction_of_the_masked_pixels():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 8, 8)
    bool_masked_pos = torch.tensor([[True, False, False, True], [False, True, False, False]])
    mask = pixel_mask(bool_masked_pos, (2, 2), 4)
    garbage_where_visible = torch.where(mask.bool(), images, torch.randn_like(images) * 100)
    assert masked_l1_loss(images, garbage_where_visible, mask).item() == 0.0


def test_masked_l1_matches_hand_computation_and_ignores_visible_pixels():
    images = torch.zeros(1, 3, 4, 4)
    reconstruction = torch.zeros(1, 3, 4, 4)
    # patches of 2x2 pixels; patch 0 (top-left) and patch 3 (bottom-right) are masked
    bool_masked_pos = torch.tensor([[True, False, False, True]])
    reconstruction[0, :, 0:2, 0:2] = 1.0   # patch 0: |error| 1 on 12 values (4 pixels x 3 channels)
    reconstruction[0, 0, 2:4, 2:4] = -3.0  # patch 3: |error| 3 on 4 values (channel 0 only)
    reconstruction[0, :, 0:2, 2:4] = 50.0  # patch 1 is visible: must not count
    mask = pixel_mask(bool_masked_pos, (2, 2), 2)
    # (12 x 1 + 4 x 3) / (8 masked pixels x 3 channels)
    assert masked_l1_loss(images, reconstruction, mask).item() == pytest.approx(24 / 24, abs=1e-5)
    reconstruction[0, :, 2:4, 0:2] = -7.0  # patch 2 also visible
    assert masked_l1_loss(images, reconstruction, mask).item() == pytest.approx(1.0, abs=1e-5)


def test_model_loss_is_the_l1_over_the_masked_patches_of_its_reconstruction():
    model = SimMIM(tiny_encoder())
    images = torch.randn(2, 3, 16, 16)
    bool_masked_pos = MaskGenerator(16, 4, 8, 0.6)(2, generator=torch.Generator().manual_seed(0))
    loss, reconstruction = model(images, bool_masked_pos)
    assert reconstruction.shape == images.shape
    errors = []
    for b in range(2):
        for index in torch.nonzero(bool_masked_pos[b]).flatten().tolist():
            row, col = divmod(index, 4)
            patch = (reconstruction - images)[b, :, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4]
            errors.append(patch.abs().flatten())
    assert loss.item() == pytest.approx(torch.cat(errors).mean().item(), rel=1e-4)
    assert model(images).loss is None  # no mask, no loss (as HF's DeiTForMaskedImageModeling)


# ---- mask token and the embedding layer -------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True])
def test_mask_token_replaces_masked_patch_embeddings_before_position_embedding(distilled):
    model = SimMIM(tiny_encoder(distilled=distilled)).eval()
    encoder = model.encoder
    prefix = 2 if distilled else 1
    images = torch.randn(2, 3, 16, 16)
    bool_masked_pos = MaskGenerator(16, 4, 8, 0.5)(2, generator=torch.Generator().manual_seed(0))
    tokens = model.embed(images, bool_masked_pos)
    assert tokens.shape == (2, prefix + 16, 24)
    pos = encoder.pos_embed[0]
    masked_rows = tokens[:, prefix:][bool_masked_pos]
    assert torch.allclose(masked_rows, (model.mask_token[0, 0] + pos[prefix:].repeat(2, 1, 1)[bool_masked_pos]))
    visible = encoder.patch_embed(images)[~bool_masked_pos] + pos[prefix:].repeat(2, 1, 1)[~bool_masked_pos]
    assert torch.allclose(tokens[:, prefix:][~bool_masked_pos], visible, atol=1e-6)
    # cls (and dist) tokens are never masked
    assert torch.allclose(tokens[:, 0], (encoder.cls_token[0, 0] + pos[0]).expand(2, -1))
    if distilled:
        assert torch.allclose(tokens[:, 1], (encoder.dist_token[0, 0] + pos[1]).expand(2, -1))


def test_masked_pixels_do_not_reach_the_embedding_layer():
    model = SimMIM(tiny_encoder()).eval()
    images = torch.randn(1, 3, 16, 16)
    bool_masked_pos = torch.zeros(1, 16, dtype=torch.bool)
    bool_masked_pos[0, [0, 5, 15]] = True  # patches (0,0), (1,1), (3,3)
    pixels = pixel_mask(bool_masked_pos, (4, 4), 4).bool().expand_as(images)
    changed_masked = torch.where(pixels, torch.full_like(images, float("nan")), images)
    changed_visible = torch.where(pixels, images, images + 1.0)
    reference = model.embed(images, bool_masked_pos)
    assert torch.equal(model.embed(changed_masked, bool_masked_pos), reference)  # even NaNs do not leak
    moved = (model.embed(changed_visible, bool_masked_pos) - reference).abs().amax(dim=-1)[0]
    assert (moved[1:][~bool_masked_pos[0]] > 0).all() and (moved[1:][bool_masked_pos[0]] == 0).all()


def test_mask_token_receives_gradient_only_through_masked_patches():
    model = SimMIM(tiny_encoder())
    images = torch.randn(2, 3, 16, 16)
    loss, _ = model(images, MaskGenerator(16, 4, 8, 0.6)(2))
    loss.backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=False)
    reconstruction = model(images, torch.zeros(2, 16, dtype=torch.bool)).reconstruction
    reconstruction.sum().backward()
    assert model.mask_token.grad.abs().sum() == 0  # nothing masked: the token is never used


def test_simmim_needs_a_vit_encoder():
    with pytest.raises(ConfigError, match="ViT/DeiT encoder"):
        SimMIM(create_timm_classifier("regnetx_002", num_classes=0))


@pytest.mark.parametrize("distilled", [False, True])
def test_pretraining_drops_the_classifier(distilled):
    model = SimMIM(tiny_encoder(distilled=distilled, num_classes=10))
    assert model.encoder.num_classes == 0 and not any(k.startswith("encoder.head") for k in model.state_dict())
    assert model(torch.randn(1, 3, 16, 16)).reconstruction.shape == (1, 3, 16, 16)


def test_wrong_mask_shape_is_refused():
    with pytest.raises(ValueError, match="num_patches"):
        SimMIM(tiny_encoder())(torch.randn(2, 3, 16, 16), torch.zeros(2, 15, dtype=torch.bool))


def test_tokens_get_no_weight_decay_and_the_mask_token_does_as_official():
    model = SimMIM(tiny_encoder(distilled=True))
    optimizer, _ = OptimRecipe(weight_decay=0.05).build(model, 512, 100, 10)
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decay}
    # official VisionTransformerForSimMIM lists only pos_embed/cls_token: its (1, 1, dim) mask token is decayed
    assert "mask_token" in names and "encoder.pos_embed" not in names and "encoder.cls_token" not in names
    assert "encoder.dist_token" not in names and not any(n.endswith(".bias") or "norm" in n for n in names)
    assert "encoder.blocks.0.attn.qkv.weight" in names and "decoder.0.weight" in names


def test_reconstruction_grid_rows_original_masked_and_predicted():
    module = SimMIMModule(tiny_encoder(), OptimRecipe(), mask_patch_size=8, num_logged_images=2)
    images = torch.rand(3, 3, 16, 16) * 2 - 1  # normalised with mean = std = 0.5
    reconstruction = torch.full_like(images, -1.0)  # black after unnormalising
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, 0] = True  # the top-left patch
    grid = module.reconstruction_grid(images, mask, reconstruction, (0.5,) * 3, (0.5,) * 3)
    assert grid.shape == (3, 3 * 17 + 1, 2 * 17 + 1)  # 3 rows x 2 images of 16 px, 1 px padding
    cell = lambda row, col: grid[:, 1 + row * 17:17 + row * 17, 1 + col * 17:17 + col * 17]  # noqa: E731
    original = (images[:2] + 1) / 2
    for col in range(2):
        assert torch.allclose(cell(0, col), original[col], atol=1e-6)
        assert torch.allclose(cell(1, col)[:, :4, :4], torch.full((3, 4, 4), 0.5))  # masked patch: grey
        assert torch.allclose(cell(1, col)[:, 4:], original[col][:, 4:], atol=1e-6)  # visible: as given
        assert torch.equal(cell(2, col)[:, :4, :4], torch.zeros(3, 4, 4))  # masked patch: the prediction
        assert torch.allclose(cell(2, col)[:, :, 4:], original[col][:, :, 4:], atol=1e-6)


# ---- fine-tuning from a SimMIM checkpoint -----------------------------------------------------------
def _simmim_checkpoint(tmp_path, distilled=False, **overrides):
    module = SimMIMModule(tiny_encoder(distilled=distilled, **overrides), OptimRecipe(), mask_patch_size=8)
    with torch.no_grad():  # not the initial values: every tensor must really come from the file
        for p in module.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "simmim.ckpt"
    torch.save({"state_dict": module.state_dict(), "epoch": 3}, path)  # a Lightning checkpoint's layout
    return path, module.model


def test_init_from_simmim_loads_every_encoder_weight(tmp_path):
    path, simmim = _simmim_checkpoint(tmp_path)
    student = create_deit(**TINY, num_classes=10, init_from=str(path))
    source, target = simmim.encoder.state_dict(), student.state_dict()
    assert set(target) - set(source) == {"head.weight", "head.bias"}  # the only new weights
    for key, tensor in source.items():
        assert torch.equal(target[key], tensor), key


def test_init_from_simmim_with_layer_scale_into_a_mean_pooled_student(tmp_path, caplog):
    """SimMIM's fine-tuning: layer scale as pretrained, mean pooling with a new norm after it (fc_norm)."""
    path, simmim = _simmim_checkpoint(tmp_path, init_values=0.1)
    with caplog.at_level("INFO", logger="deit_train.models.checkpoint"):
        student = create_deit(**TINY, num_classes=10, init_values=0.1, global_pool="avg", init_from=str(path))
    source, target = simmim.encoder.state_dict(), student.state_dict()
    assert set(target) - set(source) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(target["blocks.2.ls2.gamma"], source["blocks.2.ls2.gamma"])  # layer scale came from the file
    assert torch.equal(target["fc_norm.weight"], torch.ones(24))  # new, as the official fine-tuning leaves it
    assert "new: fc_norm.weight, fc_norm.bias, head.weight, head.bias; left behind: norm.weight, norm.bias" in caplog.text


def test_init_from_simmim_into_a_distilled_student(tmp_path):
    path, simmim = _simmim_checkpoint(tmp_path)
    student = create_deit(**TINY, num_classes=10, distilled=True, init_from=str(path))
    source, target = simmim.encoder.state_dict(), student.state_dict()
    assert set(target) - set(source) == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias",
                                         "dist_token"}
    for key, tensor in source.items():
        if key != "pos_embed":
            assert torch.equal(target[key], tensor), key
    # the distillation slot of the position embedding starts as the class slot; the patches' are unchanged
    pos, src = target["pos_embed"][0], source["pos_embed"][0]
    assert torch.equal(pos[0], src[0]) and torch.equal(pos[1], src[0]) and torch.equal(pos[2:], src[1:])
    cls, dist = forward_heads(student, torch.randn(2, 3, 16, 16))  # ready for distillation fine-tuning
    assert cls.shape == dist.shape == (2, 10)


def test_init_from_simmim_of_another_architecture_lists_the_keys(tmp_path):
    path, _ = _simmim_checkpoint(tmp_path, num_hidden_layers=2)
    with pytest.raises(ConfigError, match=r"model.init_from=.*missing \['blocks\.2\."):
        create_deit(**TINY, num_classes=10, init_from=str(path))


def test_init_from_simmim_with_an_unknown_key_is_an_error(tmp_path):
    path, _ = _simmim_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    checkpoint["state_dict"]["model.encoder.adapter.weight"] = torch.zeros(3)
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError, match=r"unexpected \['adapter.weight'\]"):
        create_deit(**TINY, num_classes=10, init_from=str(path))


# ---- layer-wise lr decay ----------------------------------------------------------------------------
@pytest.mark.parametrize("distilled", [False, True])
def test_layer_decay_gives_each_block_its_lr(distilled):
    depth, decay, base_lr = 3, 0.65, 1.25e-3
    student = create_deit(**{**TINY, "num_hidden_layers": depth}, num_classes=10, distilled=distilled)
    recipe = OptimRecipe(base_lr=base_lr, layer_decay=decay, warmup_epochs=1, warmup_lr=0.0, min_lr=0.0)
    optimizer, scheduler = recipe.build(student, global_batch=1024, total_steps=100, steps_per_epoch=10)
    scheduler.step_update(num_updates=10)  # warmup over: the cosine starts at the peak lr
    peak = base_lr * 1024 / 512
    # SimMIM's get_vit_layer: embeddings 0, block k -> k + 1, everything else depth + 1 (lr x 1): the final norm,
    # the heads and a distillation token (new when fine-tuning a SimMIM encoder; timm would put it at decay^4)
    expected = {"patch_embed.proj.weight": decay ** (depth + 1), "pos_embed": decay ** (depth + 1),
                "cls_token": decay ** (depth + 1), "norm.weight": 1.0, "norm.bias": 1.0, "head.weight": 1.0,
                "head.bias": 1.0}
    expected.update({f"blocks.{k}.mlp.fc1.weight": decay ** (depth - k) for k in range(depth)})
    expected.update({f"blocks.{k}.norm1.bias": decay ** (depth - k) for k in range(depth)})
    if distilled:
        expected.update({"dist_token": 1.0, "head_dist.weight": 1.0, "head_dist.bias": 1.0})
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(student.named_parameters())
    for name, scale in expected.items():
        assert lr_of[id(params[name])] == pytest.approx(peak * scale, rel=1e-9), name
    assert len(lr_of) == len(params)  # every parameter is optimised
    assert sorted({round(g["lr"] / peak, 9) for g in optimizer.param_groups}) == \
        sorted({round(decay ** (depth + 1 - i), 9) for i in range(depth + 2)})
    # weight decay as without layer decay: not on 1-d parameters, tokens and position embedding
    assert decay_of[id(params["blocks.0.attn.qkv.weight"])] == 0.05 and decay_of[id(params["head.weight"])] == 0.05
    assert decay_of[id(params["cls_token"])] == decay_of[id(params["pos_embed"])] == decay_of[id(params["norm.bias"])] == 0


def test_layer_decay_needs_a_vit():
    with pytest.raises(ConfigError, match="optim.layer_decay=0.65 needs a ViT"):
        OptimRecipe(layer_decay=0.65).build(torch.nn.Linear(2, 2), 512, 10, 1)


# ---- data ---------------------------------------------------------------------------------------------
def test_simmim_transform_goes_on_the_training_images_only():
    data = DigitsDataModule(image_size=16, batch_size=8)
    data.setup("fit")
    SimMIMTrainTransform(hflip=0.0).setup(SimpleNamespace(datamodule=data), None, "fit")
    torch.manual_seed(0)
    crops = torch.stack([data.train_set[0][0] for _ in range(6)])
    assert crops.shape == (6, 3, 16, 16) and crops.dtype == torch.float32
    assert len({tuple(c.flatten().tolist()) for c in crops}) > 1  # random resized crops differ
    assert -1.0 <= crops.min() and crops.max() <= 1.0  # normalised with the data's mean/std (0.5, 0.5)
    val_image, _ = data.val_set[0]
    expected = (data.val_set.images[0].float() / 255 - 0.5) / 0.5
    assert torch.allclose(val_image, expected, atol=1e-6)  # evaluation keeps the source's transform


def test_simmim_transform_needs_a_per_image_transform():
    data = SimpleNamespace(train_set=TensorDataset(torch.zeros(2, 3, 8, 8)), image_size=8, mean=(0,), std=(1,))
    with pytest.raises(ConfigError, match="simmim_transform"):
        SimMIMTrainTransform().setup(SimpleNamespace(datamodule=data), None, "fit")


# ---- end to end: the staged quickstart (pretrain -> fine-tune, and from scratch) ------------------------
def test_simmim_quickstart_stages_write_images_checkpoints_and_both_scores(tmp_path):
    run = tmp_path / "run"
    proc = run_cli_in_process(["experiment=simmim_quickstart", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
                               "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"], run, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((run / "results.json").read_text())
    assert set(results["stages"]) == {"pretrain", "finetune", "scratch"}
    pretrain = results["stages"]["pretrain"]
    assert pretrain["test/loss"] > 0 and "loss" in pretrain["best_checkpoint"]
    for stage in ("finetune", "scratch"):
        assert 0.0 <= results["stages"][stage]["test/top1"] <= 1.0
        assert results["stages"][stage]["run_dir"] == str(run / stage)
    last = torch.load(run / "pretrain" / "checkpoints" / "last.ckpt", weights_only=False)
    assert "model.mask_token" in last["state_dict"] and last["global_step"] == 3
    # the fine-tuning stage started from the pretrained encoder, the scratch stage did not
    log = (run / "train.log").read_text()
    assert f"initialised student from {run / 'pretrain' / 'checkpoints' / 'last.ckpt'}" in log
    assert log.count("initialised student from") == 1
    assert "(new: head.weight, head.bias)" in log  # the classifier starts new (the log said "new: none")
    # no labels to score: the pretraining curve is the reconstruction loss, not an empty val_top1.png
    assert results["stages"]["pretrain"]["curves"] == str(run / "pretrain" / "val_loss.png")
    assert not (run / "pretrain" / "val_top1.png").exists()
    assert (run / "pretrain" / "val_loss.png").read_bytes()[:4] == b"\x89PNG"
    # the reconstruction grid of step 0: rows original / masked / reconstruction, 8 images of 32 px
    png = run / "pretrain" / "simmim_images" / "step0000000.png"
    with Image.open(png) as grid:
        assert grid.size == (8 * 33 + 1, 3 * 33 + 1)
    assert "finetune" in proc.stdout and "scratch" in proc.stdout


def test_loss_curve_keeps_the_last_record_of_each_epoch(tmp_path):
    csv_file = tmp_path / "metrics.csv"
    csv_file.write_text("epoch,step,train/loss_epoch,val/loss\n0,3,,0.9\n0,3,0.95,\n1,7,,0.7\n1,7,,0.6\n1,7,0.8,\n")
    assert loss_per_epoch(csv_file) == {"train/loss_epoch": {0: 0.95, 1: 0.8}, "val/loss": {0: 0.9, 1: 0.6}}
    assert plot_loss_curve(csv_file, tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
