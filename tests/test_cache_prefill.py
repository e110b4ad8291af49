"""The teacher-only pre-fill and a training run key the teacher-logit cache alike: the teacher's precision as
resolved on the device it runs on (teacher.precision=auto), its outputs in the data's class order
(teacher.class_order=match). Otherwise the pre-fill writes an entry training never reads, or one labelled with
the wrong precision."""
from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import timm
import torch

import deit_train.teacher.network as network
import deit_train.teacher_cache as teacher_cache
from conftest import compose_config
from deit_train.teacher.identity import IDENTITY_KEY, TeacherIdentity
from deit_train.teacher_cache import fill_cache
from deit_train.train import train

FAKE = ["data=fake", "trainer=cpu", "data.num_classes=10", "data.num_train=32", "data.num_val=16",
        "data.source_size=[16,16]", "data.batch_size=8", "data.num_workers=0", "model=deit_tiny", "model.image_size=16",
        "model.patch_size=4", "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_attention_heads=2",
        "distill=hard", "teacher=regnetx_002_digits", "teacher.min_val_top1=0", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0",
        "trainer.enable_progress_bar=false", "test=false", "teacher.cache_topk=1", "optim.min_lr=1e-6"]


def _entries(cache_dir) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in cache_dir.glob("*/fingerprint.json")}


def _same_entry(tmp_path, *extra) -> tuple[dict, dict]:
    """(training's entries, the pre-fill's entries) for the same overrides."""
    train(compose_config([*FAKE, *extra, f"teacher.cache_dir={tmp_path / 'trained'}"], tmp_path / "run"))
    fill_cache(compose_config([*FAKE, *extra, f"teacher.cache_dir={tmp_path / 'filled'}"], tmp_path / "pass"),
               progress=False)
    return _entries(tmp_path / "trained"), _entries(tmp_path / "filled")


@pytest.fixture
def teacher_path(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pth"
    torch.save(timm.create_model("regnetx_002", num_classes=10).state_dict(), path)
    return path


def test_prefill_keys_the_precision_the_device_runs(tmp_path, teacher_path, monkeypatch):
    # the host that builds the teacher has no fast bf16; the device it runs on has (faked: both are this CPU)
    device_has_bf16 = [True]
    monkeypatch.setattr(network, "bf16_is_fast", lambda device: device_has_bf16[0])
    original_build = teacher_cache.build_teacher

    def built_on_a_host_without_bf16(config):
        device_has_bf16[0] = False
        try:
            return original_build(config)
        finally:
            device_has_bf16[0] = True

    monkeypatch.setattr(teacher_cache, "build_teacher", built_on_a_host_without_bf16)
    trained, filled = _same_entry(tmp_path, f"teacher.checkpoint={teacher_path}", "teacher.precision=auto")
    assert [f["teacher"]["precision"] for f in trained.values()] == ["bf16"]
    assert filled == trained  # same entry (digest) and the same fingerprint in it


def test_prefill_keys_the_matched_class_order(tmp_path, teacher_path):
    names = [f"class_{i}" for i in range(10)]
    permuted = names[3:] + names[:3]  # the teacher's own label order
    path = tmp_path / "permuted.pth"
    torch.save({"state_dict": torch.load(teacher_path),
                IDENTITY_KEY: asdict(TeacherIdentity(architecture="regnetx_002", class_names=permuted))}, path)
    trained, filled = _same_entry(tmp_path, f"teacher.checkpoint={path}", "teacher.class_order=match",
                                  "teacher.precision=fp32")
    (fingerprint,) = trained.values()
    assert fingerprint["teacher"]["class_order"] == [permuted.index(n) for n in names]
    assert filled == trained
