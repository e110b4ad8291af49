"""The teacher is frozen for the whole run and loads the checkpoint formats people have."""
import lightning as L
import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from deit_train.errors import ConfigError
from deit_train.losses import DeiTDistillation
from deit_train.models import create_deit
from deit_train.teacher import FrozenTeacher
from deit_train.modules import ClassificationModule, OptimRecipe


class _Data(L.LightningDataModule):
    batch_size = 8

    def __init__(self, n=32, size=32, classes=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ds = TensorDataset(torch.randn(n, 3, size, size, generator=g), torch.randint(0, classes, (n,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.ds, batch_size=8, shuffle=True)


def _student(classes=10):
    return create_deit(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_classes=classes, distilled=True)


def test_teacher_weights_unchanged_by_training(digits_teacher_file):
    # fp32: precision=auto casts the weights to bf16 on a CPU with AVX512-BF16, a change made before training
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file), precision="fp32")
    # every BatchNorm was folded at load, so no running statistics are left to drift
    assert teacher.folded_batchnorms == 44 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = ClassificationModule(_student(), DeiTDistillation("soft", tau=2.0), OptimRecipe(warmup_epochs=0, min_lr=1e-6),
                                  teacher=teacher)
    student_before = {k: v.clone() for k, v in module.student.state_dict().items()}
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=_Data())
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    after = teacher.state_dict()
    assert before and all(torch.equal(before[k], after[k]) for k in before)
    # the student did train, so the equality above is not vacuous
    assert any(not torch.equal(student_before[k], v) for k, v in module.student.state_dict().items())
    optimised = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not optimised & {id(p) for p in teacher.parameters()}


def test_train_call_keeps_eval_mode(digits_teacher_file):
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file))
    torch.nn.Sequential(teacher).train()
    assert not teacher.training and not teacher.model.training


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "student_prefix"])
def test_loads_checkpoint_formats(tmp_path, wrap):
    net = timm.create_model("regnetx_002", num_classes=5)
    sd = net.state_dict()
    payload = {"plain": sd, "state_dict": {"state_dict": sd, "epoch": 3}, "model": {"model": sd, "args": None},
               "student_prefix": {"state_dict": {f"student.{k}": v for k, v in sd.items()}}}[wrap]
    torch.save(payload, tmp_path / "t.pth")
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(tmp_path / "t.pth"), precision="fp32")  # as net's
    assert teacher.num_classes == 5
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    assert torch.allclose(teacher(x), net(x), atol=1e-5)


def test_renormalises_input_when_statistics_differ(digits_teacher_file):
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file), mean=(0.485, 0.456, 0.406),
                            std=(0.229, 0.224, 0.225), input_mean=(0.5, 0.5, 0.5), input_std=(0.5, 0.5, 0.5),
                            precision="fp32")  # its own network is called with fp32 images below
    raw = torch.rand(2, 3, 32, 32)
    student_view = (raw - 0.5) / 0.5
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(teacher(student_view), teacher.model((raw - mean) / std), atol=1e-4)


def test_teacher_forward_has_no_graph(digits_teacher_file):
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file))
    assert not teacher(torch.randn(2, 3, 32, 32, requires_grad=True)).requires_grad


def test_class_count_mismatch_is_a_clear_error_before_training(digits_teacher_file):
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file))
    with pytest.raises(ConfigError, match="teacher predicts 10 classes but the data has 7"):
        ClassificationModule(_student(classes=7), DeiTDistillation("hard"), OptimRecipe(), teacher=teacher)


def test_missing_weights_and_wrong_architecture_are_clear_errors(digits_teacher_file):
    with pytest.raises(ConfigError, match="teacher.checkpoint="):
        FrozenTeacher("regnetx_002")
    with pytest.raises(ConfigError, match="does not fit teacher.model_name") as error:
        FrozenTeacher("regnetx_004", checkpoint=str(digits_teacher_file))
    # a few keys, not the 6 KB list, and the architecture the file fits
    message = str(error.value)
    assert len(message) < 500 and "\n" not in message
    assert "keys" in message and "teacher.model_name=regnetx_002" in message
