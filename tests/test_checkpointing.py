"""Checkpoint writes are atomic; students start from the checkpoint files people have."""
import pytest
import torch

from deit_train.run.checkpoints import atomic_torch_save
from deit_train.errors import ConfigError
from deit_train.models import create_deit, load_student_weights


def _tiny(**kw):
    base = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_classes=10)
    return create_deit(**{**base, **kw})


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"epoch": 1}, path)

    def broken_save(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_cls_only_checkpoint_starts_a_distilled_student(tmp_path):
    source = _tiny()
    torch.save({"model": source.state_dict()}, tmp_path / "deit.pth")  # official DeiT layout
    target = _tiny(distilled=True)
    load_student_weights(target, tmp_path / "deit.pth")
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert torch.equal(target.head.weight, source.head.weight)
    # pos embed: cls slot and patches copied, the new dist slot starts as the cls slot
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])
    assert torch.equal(target.pos_embed[:, 1], source.pos_embed[:, 0])
    assert torch.equal(target.pos_embed[:, 2:], source.pos_embed[:, 1:])


def test_distilled_checkpoint_fine_tunes_at_higher_resolution_with_new_classes(tmp_path):
    source = _tiny(distilled=True)
    torch.save({"state_dict": {f"student.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "run.ckpt")
    target = _tiny(distilled=True, image_size=64, num_classes=3)
    head_before = target.head.weight.clone()
    load_student_weights(target, tmp_path / "run.ckpt")
    assert target.pos_embed.shape == (1, 2 + 64, 32)
    assert torch.equal(target.pos_embed[:, :2], source.pos_embed[:, :2])
    assert torch.equal(target.dist_token, source.dist_token)
    assert torch.equal(target.head.weight, head_before)  # 10 -> 3 classes: the head is new


def test_mismatched_backbone_is_a_clear_error_listing_keys(tmp_path):
    torch.save(_tiny(num_hidden_layers=1).state_dict(), tmp_path / "short.pth")
    with pytest.raises(ConfigError, match=r"missing \['blocks\.1\."):
        load_student_weights(_tiny(), tmp_path / "short.pth")


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read checkpoint"):
        load_student_weights(_tiny(), tmp_path / "bad.pth")
