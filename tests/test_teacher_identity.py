"""The teacher's identity (normalisation, resolution, class names) travels with its file and wins over the data
config; a teacher that does not recognise the images stops the run before training."""
from dataclasses import asdict

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F

from deit_train.errors import ConfigError
from deit_train.losses import DeiTDistillation
from deit_train.models import create_deit
from deit_train.teacher import FrozenTeacher
from deit_train.teacher import network as teacher_module
from deit_train.teacher.identity import IDENTITY_KEY, TeacherIdentity, read_teacher_identity, teacher_file
from deit_train.modules import ClassificationModule, OptimRecipe

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
NAMES = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def net_and_file(spread_teacher_net, tmp_path_factory):
    """A digits teacher saved as this framework saves one: weights plus identity (0.5/0.5, 32 px, classes)."""
    identity = TeacherIdentity("regnetx_002", (0.5,) * 3, (0.5,) * 3, 32, "bicubic", NAMES)
    path = tmp_path_factory.mktemp("identity") / "teacher.pth"
    torch.save({"state_dict": spread_teacher_net.state_dict(), IDENTITY_KEY: asdict(identity)}, path)
    return spread_teacher_net, path


def test_stored_normalisation_wins_over_the_data_config(net_and_file):
    net, path = net_and_file
    raw = torch.rand(4, 3, 32, 32)
    # the data pipeline normalises with ImageNet's statistics (data=imagefolder), the teacher learnt 0.5/0.5
    # fp32 like net (precision=auto would pick bf16 on a CPU with AVX512-BF16)
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(path), input_mean=IMAGENET[0], input_std=IMAGENET[1],
                            precision="fp32")
    student_view = (raw - torch.tensor(IMAGENET[0]).view(1, 3, 1, 1)) / torch.tensor(IMAGENET[1]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = net((raw - 0.5) / 0.5)
    assert teacher.mean == (0.5,) * 3 and teacher.image_size == 32
    assert torch.allclose(teacher(student_view), expected, atol=1e-4 * expected.abs().max())
    # an explicit teacher.mean/std still wins
    explicit = FrozenTeacher("regnetx_002", checkpoint=str(path), mean=IMAGENET[0], std=IMAGENET[1],
                             input_mean=IMAGENET[0], input_std=IMAGENET[1])
    assert explicit.mean == IMAGENET[0] and not explicit.renormalise


def test_teacher_sees_its_own_resolution(net_and_file):
    net, path = net_and_file
    batch48 = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        expected = net(F.interpolate(batch48, size=(32, 32), mode="bicubic", antialias=True, align_corners=False))
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(path), input_mean=(0.5,) * 3, input_std=(0.5,) * 3,
                            precision="fp32")  # as net
    assert torch.allclose(teacher(batch48), expected, atol=1e-4 * expected.abs().max())
    assert FrozenTeacher("regnetx_002", checkpoint=str(path), image_size=48).image_size == 48
    assert teacher.fingerprint()["image_size"] == 32


def test_class_order_is_matched_or_refused(net_and_file):
    net, path = net_and_file
    shuffled = list(reversed(NAMES))
    with pytest.raises(ConfigError, match="another order than the data's.*teacher.class_order=match"):
        FrozenTeacher("regnetx_002", checkpoint=str(path)).match_classes(shuffled)
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(path), class_order="match", input_mean=(0.5,) * 3,
                            input_std=(0.5,) * 3, precision="fp32")  # as net
    teacher.match_classes(shuffled)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = net(x)
    assert torch.allclose(teacher(x), plain.flip(-1), atol=1e-4 * plain.abs().max())  # data class i = teacher 9 - i
    with pytest.raises(ConfigError, match=r"other classes than the data \(teacher only: \['0', '1', '2'\], data only: "
                                          r"\['eight', 'five', 'four'\]"):
        teacher.match_classes(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


def test_bootstrapped_teacher_file_carries_its_identity(tmp_path, digits_teacher_file):
    """`teacher_file` turns a Lightning checkpoint of ours (with its stored run config) into weights + identity."""
    net = timm.create_model("regnetx_002", num_classes=10)
    stored = {"model": {"_target_": "deit_train.models.create_timm_classifier", "name": "regnetx_002"},
              "data": {"mean": [0.5] * 3, "std": [0.5] * 3, "image_size": 32, "interpolation": "bicubic"},
              "class_names": NAMES}
    torch.save({"state_dict": {f"student.{k}": v for k, v in net.state_dict().items()}, "deit_train": stored},
               tmp_path / "best.ckpt")
    torch.save(teacher_file(tmp_path / "best.ckpt"), tmp_path / "teacher.pth")
    identity = read_teacher_identity(tmp_path / "teacher.pth")
    assert identity == TeacherIdentity("regnetx_002", (0.5,) * 3, (0.5,) * 3, 32, "bicubic", NAMES)
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(tmp_path / "teacher.pth"))
    assert (teacher.mean, teacher.image_size, teacher.class_names) == ((0.5,) * 3, 32, NAMES)
    # a plain state dict knows nothing: timm's (ImageNet) normalisation, the student's resolution
    plain = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file))
    assert plain.mean == IMAGENET[0] and plain.image_size is None and plain.class_names is None


def test_key_mismatch_names_the_architecture_from_the_file(net_and_file):
    _, path = net_and_file
    with pytest.raises(ConfigError, match="the file is a regnetx_002: set teacher.model_name=regnetx_002") as error:
        FrozenTeacher("regnety_002", checkpoint=str(path))
    assert len(str(error.value)) < 500


def test_fingerprint_is_json_and_follows_the_weights(net_and_file, digits_teacher_file):
    import json

    _, path = net_and_file
    one = FrozenTeacher("regnetx_002", checkpoint=str(path)).fingerprint()
    assert json.loads(json.dumps(one)) == one
    assert one == FrozenTeacher("regnetx_002", checkpoint=str(path)).fingerprint()
    other = FrozenTeacher("regnetx_002", checkpoint=str(digits_teacher_file)).fingerprint()
    assert other["weights_sha256"] != one["weights_sha256"] and one["precision"] in ("fp32", "bf16")


def test_pretrained_true_loads_the_deit_teacher(monkeypatch):
    created, create = [], timm.create_model

    def fake_create(name, pretrained=False, **kwargs):  # no network: record the name, build a small random net
        created.append((name, pretrained))
        return create("regnetx_002", pretrained=False, **kwargs)

    monkeypatch.setattr(teacher_module.timm, "create_model", fake_create)
    FrozenTeacher("regnety_160", pretrained=True)
    assert created == [("regnety_160.deit_in1k", True)]


class _Batches(L.LightningDataModule):
    batch_size = 8

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = torch.utils.data.TensorDataset(torch.randn(32, 3, 16, 16, generator=g),
                                                   torch.randint(0, 10, (32,), generator=g))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.data, batch_size=8)

    val_dataloader = train_dataloader


def test_a_teacher_that_misses_the_images_stops_the_run(net_and_file):
    _, path = net_and_file
    student = create_deit(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_classes=10, distilled=True)
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(path), min_val_top1=0.9)  # random images: ~chance
    module = ClassificationModule(student, DeiTDistillation("hard"), OptimRecipe(min_lr=1e-6), teacher=teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=2)
    with pytest.raises(ConfigError, match=r"the teacher does not recognise these images: top-1 0\.\d+ .* below "
                                          r"teacher.min_val_top1=0.900; check its resolution \(teacher.image_size=32"):
        trainer.fit(module, datamodule=_Batches())
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # stopped before training


def test_safetensors_metadata_carries_the_identity(net_and_file, tmp_path):
    import json

    from safetensors.torch import save_file

    net, _ = net_and_file
    identity = TeacherIdentity("regnetx_002", (0.5,) * 3, (0.5,) * 3, 24, "bilinear", NAMES)
    save_file(net.state_dict(), str(tmp_path / "t.safetensors"), metadata={IDENTITY_KEY: json.dumps(asdict(identity))})
    teacher = FrozenTeacher("regnetx_002", checkpoint=str(tmp_path / "t.safetensors"))
    assert (teacher.mean, teacher.image_size, teacher.interpolation, teacher.class_names) == \
           ((0.5,) * 3, 24, "bilinear", NAMES)
