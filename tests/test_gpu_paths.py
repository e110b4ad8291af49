"""The paths a first GPU run takes, exercised on CPU (issue 19): EMA under DDP (gloo), FSDP's flattened parameters,
fp16 with gradient clipping where the recipe would pick a fused optimizer, compiled students with diagnostics."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from conftest import FAST_DIGITS, compose_config, run_cli, run_cli_in_process


def _checkpoint(run_dir, pattern: str) -> dict:
    [path] = sorted((run_dir / "checkpoints").glob(pattern))
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_ema_is_kept_outside_the_wrapped_module_and_frozen(tmp_path):
    """timm's train.py keeps the EMA outside DDP: a registered copy would be wrapped, and its parameters (which keep
    requires_grad from the deepcopy) would be gradients DDP waits for and never gets."""
    cfg = compose_config(["experiment=quickstart", *FAST_DIGITS, "distill=none", "~teacher", "teacher_recipe=null",
                          "module.ema_decay=0.9"], tmp_path)
    module = instantiate(cfg.module)
    assert {name.split(".")[0] for name, _ in module.named_parameters()} == {"student"}
    assert all(p.requires_grad for p in module.student.parameters())
    assert not any(p.requires_grad for p in module.ema.module.parameters())


def test_ema_under_two_process_ddp_trains_and_moves(tmp_path, digits_teacher_file):
    """2 gloo processes, 2 epochs with an EMA: no "Expected to have finished reduction" at step 2, the EMA weights
    of epoch 1 differ from epoch 0's and from the student's, and the checkpoints hold them (resume: test_stream)."""
    args = ["experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0",
            *FAST_DIGITS, "trainer.max_epochs=2", "module.ema_decay=0.5", "strategy=ddp_cpu", "trainer.devices=2",
            "callbacks.model_checkpoint.save_top_k=-1", "test=false"]
    proc = run_cli(args, tmp_path / "ddp", tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = _checkpoint(tmp_path / "ddp", "epoch000-*.ckpt"), _checkpoint(tmp_path / "ddp", "epoch001-*.ckpt")
    ema_keys = [k for k in second if k.startswith("ema.module.")]
    assert ema_keys and len(ema_keys) == len([k for k in second if k.startswith("student.")])
    weight = "ema.module.blocks.0.attn.qkv.weight"
    assert not torch.equal(first[weight], second[weight])  # the EMA moved during epoch 1
    assert not torch.equal(second[weight], second["student.blocks.0.attn.qkv.weight"])  # and is not the student
    with open(tmp_path / "ddp" / "csv" / "metrics.csv", newline="") as handle:
        ema_top1 = [row["val_ema/top1"] for row in csv.DictReader(handle) if row.get("val_ema/top1")]
    assert len(ema_top1) == 2


def test_ema_of_a_bf16_true_student_is_kept_and_evaluated_in_float32():
    """trainer.precision=bf16-true makes the student bf16; its EMA stays float32 (a bf16 copy cannot take a
    (1 - decay) = 1e-3 step) and follows timm's recurrence of the bf16 weights, computed here in float64: the first
    update copies, then e = d e + (1 - d) w. Its validation runs in float32 on the bf16 batch (it crashed with
    "Input type (c10::BFloat16) and bias type (float)" after the first epoch)."""
    import lightning as L

    from deit_train.data import DigitsDataModule
    from deit_train.losses import DeiTDistillation
    from deit_train.models import create_deit
    from deit_train.modules import ClassificationModule
    from deit_train.modules.optim import OptimRecipe

    torch.manual_seed(0)
    # bf16 already when the module takes it, as a student built under Lightning's trainer.init_module() would be
    student = create_deit(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_classes=10, distilled=False, drop_path_rate=0.0).to(torch.bfloat16)
    decay, name = 0.999, "blocks.0.attn.qkv.weight"
    module = ClassificationModule(student, DeiTDistillation("none"), OptimRecipe(warmup_epochs=0), ema_decay=decay)
    weights = []

    class Record(L.Callback):  # the student after each optimizer step, before the module's hook updates the EMA
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            weights.append(pl_module.student.get_parameter(name).detach().double().clone())

    trainer = L.Trainer(max_steps=4, accelerator="cpu", precision="bf16-true", logger=False, limit_train_batches=4,
                        limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, datamodule=DigitsDataModule(image_size=16, augment=False, batch_size=16))

    assert module.student.get_parameter(name).dtype == torch.bfloat16
    assert {p.dtype for p in module.ema.module.parameters()} == {torch.float32}
    expected = weights[0]
    for weight in weights[1:]:
        expected = decay * expected + (1 - decay) * weight
    ema = module.ema.module.get_parameter(name).double()
    assert len(weights) == 4 and not torch.equal(ema, weights[-1])
    torch.testing.assert_close(ema, expected, rtol=1e-6, atol=1e-7)
    assert 0 <= float(trainer.callback_metrics["val_ema/top1"]) <= 1


# ---- FSDP: weight-decay groups from the shapes recorded before wrapping --------------------------------------------
class _FSDPUnit(torch.nn.Module):
    """What FSDP's auto-wrap does to a block's names: ``blocks.0._fsdp_wrapped_module.attn...``."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self._fsdp_wrapped_module = module


def _shard_like_fsdp(model: torch.nn.Module) -> None:
    """FSDP with use_orig_params as configure_optimizers sees it: each block its own unit, and every parameter a
    1-d view of its rank's shard of the flat parameter (here: the whole parameter flattened)."""
    for index, block in enumerate(list(model.blocks)):
        model.blocks[index] = _FSDPUnit(block)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            setattr(module, name, torch.nn.Parameter(param.detach().flatten()))


def _decay_by_name(model, optimizer) -> dict[str, tuple[float, float]]:
    names = {id(p): n.replace("_fsdp_wrapped_module.", "") for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], g.get("lr_scale", 1.0)) for g in optimizer.param_groups
            for p in g["params"]}


@pytest.mark.parametrize("layer_decay", [None, 0.65])
def test_fsdp_flattened_parameters_keep_their_weight_decay_groups(tmp_path, layer_decay):
    from deit_train.modules.optim import OptimRecipe

    cfg = compose_config(["experiment=quickstart", *FAST_DIGITS, "distill=none", "~teacher", "teacher_recipe=null",
                          f"optim.layer_decay={layer_decay if layer_decay else 'null'}"], tmp_path)
    plain = instantiate(cfg.module)
    expected = _decay_by_name(plain.student, OptimRecipe(layer_decay=layer_decay).build(plain.student, 512, 100, 10)[0])
    assert expected["blocks.0.attn.qkv.weight"][0] == 0.05 and expected["blocks.0.norm1.weight"][0] == 0.0

    module = instantiate(cfg.module)
    module.setup("fit")  # Lightning: setup, then the strategy wraps, then configure_optimizers
    _shard_like_fsdp(module.student)
    assert all(p.ndim == 1 for p in module.student.parameters())
    optimizer = module.optim.build(module.student, 512, 100, 10, ndims=module._parameter_ndims)[0]
    assert _decay_by_name(module.student, optimizer) == expected


# ---- fp16/bf16 with gradient clipping where the recipe picks the fused AdamW (CUDA) ---------------------------------
@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_with_clipping_trains_where_adamw_would_be_fused(tmp_path, monkeypatch, precision):
    """On CUDA the recipe fuses AdamW; Lightning's mixed-precision plugin refuses to clip the gradients of an
    optimizer that unscales in its step ("HINT: Are you using a 'fused' optimizer?"). The CUDA choice is faked on
    CPU (torch's fused AdamW runs there too); fp16 gets its GradScaler as on CUDA."""
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision

    import deit_train.modules.optim as optim

    monkeypatch.setattr(optim, "parameters_on_cuda", lambda model: True)
    cfg = compose_config(["experiment=quickstart", *FAST_DIGITS, "distill=none", "~teacher", "teacher_recipe=null"],
                         tmp_path)
    module, data = instantiate(cfg.module), instantiate(cfg.data)
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    trainer = L.Trainer(accelerator="cpu", plugins=[MixedPrecision(precision, "cpu", scaler)], gradient_clip_val=1.0,
                        max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    defaults = trainer.optimizers[0].defaults
    assert defaults["foreach"] is True and not defaults["fused"]
    # without clipping the fused kernel stays the CUDA choice
    assert optim.OptimRecipe().kernel_options(module.student, clipped_under_amp=False) == {"fused": True}


# ---- FSDP combinations that would run wrong are refused before anything trains -------------------------------------
DISTILL = ["experiment=deit_small_distill", "teacher.checkpoint=/t.pth"]


@pytest.mark.parametrize("overrides, refused", [
    ([*DISTILL, "module.ema_decay=0.99996"], "module.ema_decay=0.99996 does not work with "
     "strategy=fsdp (the student's parameters are shards): use strategy=ddp, or module.ema_decay=null"),
    (["experiment=simmim_pretrain"], "trainer.gradient_clip_val=5.0 does not work with strategy=fsdp (Lightning's "
     "FSDP precision plugin cannot clip): use strategy=ddp, or trainer.gradient_clip_val=null"),
    (DISTILL, "callbacks.token_diagnostics does not work with strategy=fsdp (the heads' "
     "weights are sharded): use strategy=ddp, or drop it with ~callbacks.token_diagnostics"),
])
def test_fsdp_refuses_what_it_would_run_wrong(tmp_path, overrides, refused):
    from deit_train.errors import ConfigError
    from deit_train.run.preflight import check_options

    with pytest.raises(ConfigError) as error:
        check_options(compose_config([*overrides, "strategy=fsdp"], tmp_path))
    assert str(error.value) == refused
    check_options(compose_config(overrides, tmp_path))  # DDP takes them


def test_fsdp_takes_a_distilled_run_without_those_options(tmp_path):
    from deit_train.run.preflight import check_options

    check_options(compose_config([*DISTILL, "strategy=fsdp", "~callbacks.token_diagnostics"], tmp_path))
    check_options(compose_config(["experiment=simmim_pretrain", "strategy=fsdp", "trainer.gradient_clip_val=null"],
                                 tmp_path))


def test_fsdp_refusal_is_one_line_and_exit_2_before_training(tmp_path, digits_teacher_file):
    proc = run_cli_in_process(["experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}", "strategy=fsdp",
                               "module.ema_decay=0.9"], tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == ("error: module.ema_decay=0.9 does not work with strategy=fsdp (the "
                                                    "student's parameters are shards): use strategy=ddp, or "
                                                    "module.ema_decay=null")
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- a compiled student still fills the token diagnostics --------------------------------------------------------
def _diagnosed_fit(tmp_path, teacher_file, compile: bool) -> list[float]:
    import lightning as L

    from deit_train.run.diagnostics import TokenDiagnostics

    cfg = compose_config(["experiment=quickstart", *FAST_DIGITS, f"teacher.checkpoint={teacher_file}",
                          "teacher.min_val_top1=0", "teacher.precision=fp32", f"module.compile={compile}"], tmp_path)
    L.seed_everything(0)
    module, data, diagnostics = instantiate(cfg.module), instantiate(cfg.data), TokenDiagnostics()
    # the sanity check compiles the evaluation graph before the first validation epoch, as in a real run
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=2,
                        num_sanity_val_steps=1, callbacks=[diagnostics], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, data)
    assert [record["epoch"] for record in diagnostics.history] == [0]
    return diagnostics.history[0]["cosine"]


def test_compiled_student_fills_the_token_diagnostics_like_the_eager_one(tmp_path, digits_teacher_file):
    import torch._inductor.config

    # drop-path draws as eager draws them; inductor's own patch (a monkeypatch's undo left the option missing for
    # later compiled tests in the same process)
    with torch._inductor.config.patch(fallback_random=True):
        eager = _diagnosed_fit(tmp_path / "eager", digits_teacher_file, compile=False)
        compiled = _diagnosed_fit(tmp_path / "compiled", digits_teacher_file, compile=True)
    assert len(compiled) == len(eager) == 3  # embeddings, block 1, output norm of the 2-block student
    # the compiled kernels reorder float sums: cosines agree to 1e-4
    assert compiled == pytest.approx(eager, abs=1e-4)


# ---- every *-true precision on the uint8 path (issue 27, item 1) -----------------------------------------------------
@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """A small ImageNet-layout folder of RGB JPEGs (2 classes, 8 train and 2 val images each, 40-64 px)."""
    from PIL import Image

    root, rng = tmp_path_factory.mktemp("jpegs"), np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 2)):
        for label in range(2):
            (root / split / f"c{label}").mkdir(parents=True)
            for n in range(count):
                width, height = [(48, 40), (64, 48), (40, 56)][n % 3]
                Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
                    root / split / f"c{label}" / f"{n}.jpg", quality=90)
    return root


@pytest.mark.parametrize("device", [False, True], ids=["uint8 workers", "augment.device"])
def test_every_true_precision_trains_on_the_uint8_path_with_the_float32_runs_draws(tmp_path, monkeypatch,
                                                                                    jpeg_folder, device):
    """Lightning converts a batch's floating tensors to the precision's dtype BEFORE on_after_batch_transfer: the
    device stage handed float32 images to a bf16/fp16/fp64 student ("Input type (float) and bias type
    (c10::BFloat16)") and, with augment.device=true, RandAugment's magnitudes arrived rounded to bf16/fp16. Now
    each *-true run's training batches are the float32 run's, converted to the precision's dtype as Lightning
    converts a float worker's batch, from the same float64 magnitudes; and it validates."""
    from deit_train.data.base import ImageDataModule
    from deit_train.data.device_augment import DeviceFinish
    from deit_train.train import train

    seen: list = []
    after_transfer, rand_augment = ImageDataModule.on_after_batch_transfer, DeviceFinish.rand_augment

    def recording(self, batch, dataloader_idx):
        out = after_transfer(self, batch, dataloader_idx)
        if self.trainer is not None and self.trainer.training:
            seen.append(("batch", out[0].detach().clone()))
        return out

    monkeypatch.setattr(ImageDataModule, "on_after_batch_transfer", recording)
    monkeypatch.setattr(DeviceFinish, "rand_augment", lambda self, images, ops, args: (
        seen.append(("magnitudes", ops.copy(), args.copy())), rand_augment(self, images, ops, args))[1])

    def run(precision: str) -> tuple[list, dict]:
        seen.clear()
        results = train(compose_config([
            "experiment=deit_tiny", f"data.root={jpeg_folder}", "trainer=cpu", f"trainer.precision={precision}",
            f"augment.device={device}", "model.image_size=16", "model.patch_size=4", "model.hidden_size=32",
            "model.num_hidden_layers=1", "model.num_attention_heads=2", "data.batch_size=4", "data.num_workers=0",
            "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false", "test=false", "optim.min_lr=1e-7",
            "optim.eps=1e-4", "augment.re_prob=0.5"], tmp_path / precision))
        return list(seen), results

    reference, _ = run("32-true")
    batches = [b for kind, b in (r[:2] for r in reference) if kind == "batch"]
    assert len(batches) == 2 and all(b.dtype == torch.float32 for b in batches)
    magnitudes = [r for r in reference if r[0] == "magnitudes"]
    assert (len(magnitudes) == 2) == device and all(r[2].dtype == np.float64 for r in magnitudes)
    for precision, dtype in (("bf16-true", torch.bfloat16), ("16-true", torch.float16), ("64-true", torch.float64)):
        got, results = run(precision)
        assert [r[0] for r in got] == [r[0] for r in reference], precision
        for mine, theirs in zip(got, reference):
            if mine[0] == "batch":
                assert mine[1].dtype == dtype and torch.equal(mine[1], theirs[1].to(dtype)), precision
            else:  # the same ops and the same float64 magnitudes, not their bf16/fp16 roundings
                assert np.array_equal(mine[1], theirs[1]) and np.array_equal(mine[2], theirs[2]), precision
        assert 0 <= results["last_epoch/val/top1"] <= 1, (precision, results)


def test_half_precision_with_an_eps_float16_cannot_hold_is_refused_in_one_line(tmp_path, jpeg_folder):
    """16-true with AdamW's default eps=1e-8 (0 in float16) turns weights inf/nan at the first step on any device:
    refused before anything trains, exit 2; optim.eps=1e-4 trains (test above)."""
    proc = run_cli_in_process(["experiment=deit_tiny", f"data.root={jpeg_folder}", "trainer=cpu",
                               "trainer.precision=16-true"], tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: trainer.precision=16-true keeps AdamW's moments in float16, where optim.eps=1e-08 is 0 (the first step "
        "divides by zero): use trainer.precision=16-mixed or bf16-true, or set optim.eps=1e-4")


@pytest.mark.parametrize("accelerator, refused", [("mps", True), ("gpu", True), ("auto", True), ("cpu", False)])
def test_device_decode_on_an_accelerator_without_a_jpeg_decoder_is_refused(tmp_path, monkeypatch, accelerator,
                                                                           refused):
    """decode_jpeg runs on cpu and cuda; on a Mac (MPS, no CUDA) trainer=gpu or mps cannot decode there."""
    from deit_train.errors import ConfigError
    from deit_train.run.preflight import check_device_decode

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    cfg = compose_config(["experiment=deit_tiny", "data.root=/d", "augment.device=true", "augment.device_decode=true",
                          f"trainer.accelerator={accelerator}"], tmp_path)
    if not refused:
        check_device_decode(cfg)
        return
    with pytest.raises(ConfigError) as error:
        check_device_decode(cfg)
    assert str(error.value) == ("augment.device_decode=true decodes JPEGs with torchvision.io.decode_jpeg, which runs "
                                "on cpu and cuda, not on trainer.accelerator=mps: use augment.device_decode=false")
