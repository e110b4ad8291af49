"""The lean teacher (BatchNorm folded, channels_last, inference mode, its own precision, compiled) gives the plain
fp32 teacher's predictions; DDP leaves it alone; the GPU paths (bf16-mixed, compile) run on CPU."""
import lightning as L
import pytest
import timm
import torch

from deit_train.data import DigitsDataModule
from deit_train.errors import ConfigError
from deit_train.losses import DeiTDistillation
from deit_train.models import create_deit
from deit_train.teacher import FrozenTeacher
from deit_train.teacher import network as teacher_module
from deit_train.modules import ClassificationModule, OptimRecipe

HALF = (0.5, 0.5, 0.5)
# max |lean - plain| / max |plain logit| measured on the digits test split (see README): fp32 2e-7, fp16 6e-4,
# bf16 4e-3 (8 mantissa bits); the bounds leave head-room for other CPUs' kernels.
RELATIVE_TOLERANCE = {"fp32": 1e-5, "fp16": 5e-3, "bf16": 3e-2}


@pytest.fixture(scope="module")
def scaled_teacher(spread_teacher_net, tmp_path_factory):
    path = tmp_path_factory.mktemp("lean") / "teacher.pth"
    torch.save(spread_teacher_net.state_dict(), path)
    return spread_teacher_net, path


@pytest.fixture(scope="module")
def digits_images():
    data = DigitsDataModule(image_size=32, augment=False)
    data.setup("test")
    images, labels = zip(*data.test_dataloader())
    return torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])  # a CPU runs all three (bf16/fp16 emulated)
def test_lean_teacher_agrees_with_plain_fp32(scaled_teacher, digits_images, precision):
    net, path = scaled_teacher
    images = digits_images[0] if precision == "fp32" else digits_images[0][:96]  # emulated: slow
    with torch.no_grad():
        plain = net((images - 0.5) / 0.5)  # the digits pipeline normalises with 0.5/0.5
    lean = FrozenTeacher("regnetx_002", checkpoint=str(path), precision=precision, mean=HALF, std=HALF,
                         input_mean=HALF, input_std=HALF)
    logits = lean((images - 0.5) / 0.5)
    assert logits.dtype == torch.float32 and not logits.is_inference()
    assert (logits.argmax(-1) == plain.argmax(-1)).float().mean() >= 0.99
    assert (logits - plain).abs().max() / plain.abs().max() < RELATIVE_TOLERANCE[precision]
    assert next(lean.model.parameters()).dtype == teacher_module.PRECISIONS[precision]
    assert lean.model.stem.conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_auto_precision_follows_the_cpu_flags():
    flags = open("/proc/cpuinfo").read().split()
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert teacher_module.resolve_precision("auto", torch.device("cpu")) == ("bf16" if native_bf16 else "fp32")


def test_bad_precision_is_one_line(digits_teacher_file, monkeypatch):
    with pytest.raises(ConfigError, match=r"teacher.precision=int3 is not one of auto, fp32, bf16, fp16"):
        FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file), precision="int3")
    # a GPU without bf16 (pre-Ampere): the explicit choice names the alternatives, auto falls back to fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(ConfigError, match=r"teacher.precision=bf16: this cuda device has no bf16; use "
                                          r"teacher.precision=auto .* fp32 or fp16"):
        teacher_module.resolve_precision("bf16", torch.device("cuda"))
    assert teacher_module.resolve_precision("auto", torch.device("cuda")) == "fp32"


def test_teacher_logits_are_fp32_and_unaffected_by_the_students_autocast(digits_teacher_file):
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file), precision="fp32")
    x = torch.randn(4, 3, 32, 32)
    outside = teacher(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = teacher(x)
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)


def test_ddp_leaves_the_teacher_alone(digits_teacher_file, tmp_path):
    """A 1-process gloo DDP of the module: nothing of the teacher is broadcast or reduced, the student is."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    teacher = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file))
    module = ClassificationModule(_student(), DeiTDistillation("hard"), OptimRecipe(), teacher=teacher)
    assert module.teacher is teacher and not any(k.startswith("teacher.") for k in module.state_dict())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(module)
        assert not {id(b) for b in ddp.modules_buffers} & {id(b) for b in teacher.buffers()}
        synced = {id(p) for p in ddp._module_parameters}
        assert not synced & {id(p) for p in teacher.parameters()}
        assert {id(p) for p in module.student.parameters()} <= synced
    finally:
        dist.destroy_process_group()


def _student(classes=10, size=32):
    return create_deit(image_size=size, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_classes=classes, distilled=True, drop_path_rate=0.0)


def _fit_losses(teacher, precision="32-true", compile=False, steps=3):
    """train/loss of a few steps of a digits distillation run (16 px), from the same initial student and batches."""
    torch.manual_seed(0)
    module = ClassificationModule(_student(size=16), DeiTDistillation("soft", tau=2.0), OptimRecipe(warmup_epochs=0),
                                  teacher=teacher, compile=compile)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    data = DigitsDataModule(image_size=16, augment=False, batch_size=16)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[Record()])
    trainer.fit(module, datamodule=data)
    return losses, module


@pytest.mark.parametrize("teacher_precision", ["fp32", "bf16"])
def test_bf16_mixed_student_with_either_teacher_precision(digits_teacher_file, teacher_precision):
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file), precision=teacher_precision)
    seen = {}
    teacher.register_forward_hook(lambda m, args, out: seen.update(dtype=out.dtype))
    losses, module = _fit_losses(teacher, precision="bf16-mixed")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert seen["dtype"] == torch.float32
    assert next(teacher.model.parameters()).dtype == teacher_module.PRECISIONS[teacher_precision]


def test_compiled_student_and_teacher_train_like_eager(digits_teacher_file, tmp_path):
    eager, _ = _fit_losses(FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file)))
    compiled, module = _fit_losses(FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file), compile=True),
                                   compile=True)
    # same batches, same initial weights: the compiled kernels only reorder float sums
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)
    # the student stays a plain module: checkpoints and exports keep the network's own keys
    assert not any("_orig_mod" in k for k in module.state_dict())
    assert set(module.student.state_dict()) == set(_student(size=16).state_dict())
    assert set(module.teacher.state_dict()) == set(FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file))
                                                   .state_dict())


def test_adamw_step_kernel_follows_the_device():
    model = torch.nn.Linear(4, 2)
    optimizer, _ = OptimRecipe().build(model, global_batch=64, total_steps=10, steps_per_epoch=5)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]  # CPU: multi-tensor
    assert OptimRecipe(name="sgd").kernel_options(model) == {}  # only torch's Adam family has both kernels


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_adamw_is_fused_on_cuda():
    optimizer, _ = OptimRecipe().build(torch.nn.Linear(4, 2).cuda(), global_batch=64, total_steps=10,
                                       steps_per_epoch=5)
    assert optimizer.defaults["fused"] is True


def test_gpu_recipes_turn_on_the_fast_paths(tmp_path):
    from conftest import compose_config

    cfg = compose_config(["experiment=deit_small_distill", "teacher.checkpoint=/t.pth"], tmp_path)
    assert (cfg.trainer.accelerator, cfg.trainer.precision, cfg.trainer.benchmark) == ("gpu", "bf16-mixed", True)
    assert cfg.float32_matmul_precision == "high" and cfg.teacher.precision == "auto" and cfg.teacher.lean
