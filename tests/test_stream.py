"""The deterministic training stream: batches depend on (seed, epoch, position/step, rank) only -- not on the
student, the loader workers or the process history; per-rank randomness; exact resume from last.ckpt."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from timm.data import Mixup

from conftest import FAST_DIGITS, ROOT, compose_config, train_preempted_then_resumed
from deit_train.data.stream import SeededDataset, StepSeeding, seed_globals, step_seed
from deit_train.models.simmim import MaskGenerator
from deit_train.train import train

# fake photos through the full DeiT recipe (RandomResizedCrop, flip, RandAugment, random erasing, Mixup/CutMix)
FAKE = ["data=fake", "augment=deit", "trainer=cpu", "data.num_classes=10", "data.num_train=96", "data.num_val=16",
        "data.source_size=[24,24]", "data.batch_size=8", "data.num_workers=0", "model.image_size=16",
        "model.patch_size=4", "model.num_attention_heads=2", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
        "test=false", "optim.min_lr=1e-6"]
TINY_STUDENT = ["model=deit_tiny", "model.hidden_size=32", "model.num_hidden_layers=1"]
SMALL_STUDENT = ["model=deit_small", "model.hidden_size=48", "model.num_hidden_layers=2"]


def _digest(*tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture
def batch_hashes(monkeypatch):
    """Hashes of every training batch as the model sees it (after Mixup/CutMix), in order."""
    hashes = []
    original = Mixup.__call__

    def recording(self, images, target):
        images, target = original(self, images, target)
        hashes.append(_digest(images, target))
        return images, target

    monkeypatch.setattr(Mixup, "__call__", recording)
    return hashes


def _hashes(tmp_path, hashes: list, name: str, *overrides) -> list[str]:
    hashes.clear()
    train(compose_config([*FAKE, *overrides], tmp_path / name))
    assert len(hashes) == 6
    return list(hashes)


def test_training_batches_depend_on_the_stream_not_on_student_or_workers(tmp_path, batch_hashes):
    tiny = _hashes(tmp_path, batch_hashes, "tiny", *TINY_STUDENT)
    assert len(set(tiny)) == 6
    assert _hashes(tmp_path, batch_hashes, "small", *SMALL_STUDENT) == tiny
    assert _hashes(tmp_path, batch_hashes, "workers", *TINY_STUDENT, "data.num_workers=2") == tiny
    other_seed = _hashes(tmp_path, batch_hashes, "seed", *TINY_STUDENT, "seed=7")
    assert not set(other_seed) & set(tiny)


def test_sample_augmentation_depends_on_its_seed_only(tmp_path):
    cfg = compose_config(["experiment=quickstart", "augment=deit", *FAST_DIGITS], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    dataset = SeededDataset(datamodule.train_set)
    first = dataset[(5, 123)][0]
    torch.rand(1000)  # whatever ran before in the process
    dataset[(6, 999)]
    assert torch.equal(dataset[(5, 123)][0], first)
    assert not torch.equal(dataset[(5, 124)][0], first)  # the digits' own affine jitter is drawn from the seed


def test_ranks_get_their_own_augmentation_and_step_randomness(tmp_path):
    cfg = compose_config([*FAKE, *TINY_STUDENT], tmp_path)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    # repeated augmentation x3 on 2 ranks: position 0 of both ranks is the same image, augmented differently
    loaders = [datamodule.train_loader(2, rank) for rank in (0, 1)]
    keys = [next(iter(loader.sampler)) for loader in loaders]
    assert keys[0][0] == keys[1][0] and keys[0][1] != keys[1][1]
    (images0, _), (images1, _) = (next(iter(loader)) for loader in loaders)
    assert not torch.equal(images0[0], images1[0])

    mixup = instantiate(cfg.module.mixup)
    masks = MaskGenerator(16, 4, mask_patch_size=8, mask_ratio=0.5)

    def step_draws(rank: int, batch_idx: int = 0):
        StepSeeding(cfg.seed).on_train_batch_start(SimpleNamespace(current_epoch=0, global_rank=rank), None, None,
                                                   batch_idx)
        lam, use_cutmix = mixup._params_per_batch()
        return lam, use_cutmix, masks(4), torch.rand(8)  # Mixup/CutMix, SimMIM masks, drop-path's generator

    rank0, rank1, again = step_draws(0), step_draws(1), step_draws(0)
    assert rank0[0] != rank1[0] and not torch.equal(rank0[2], rank1[2]) and not torch.equal(rank0[3], rank1[3])
    assert rank0[:2] == again[:2] and torch.equal(rank0[2], again[2]) and torch.equal(rank0[3], again[3])
    assert step_draws(0, batch_idx=1)[0] != rank0[0]


def _val_rows(run_dir) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if k.startswith(("epoch", "step", "val"))}
                for row in csv.DictReader(handle) if row.get("val/top1")]


def test_resume_from_last_checkpoint_ends_like_the_uninterrupted_run(tmp_path, digits_teacher_file, monkeypatch):
    overrides = [*(a for a in FAST_DIGITS if not a.startswith(("trainer.limit_train", "trainer.limit_val"))),
                 "experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "augment=deit",
                 "module.ema_decay=0.9", "trainer.max_epochs=2", "trainer.limit_train_batches=3",
                 "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "trainer.num_sanity_val_steps=0",
                 "trainer.deterministic=true", "trainer.enable_progress_bar=false"]
    whole, resumed = train_preempted_then_resumed(overrides, tmp_path, monkeypatch)

    weights = [torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
               for n in ("whole", "requeued")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    val_whole, val_resumed = _val_rows(tmp_path / "whole"), _val_rows(tmp_path / "requeued")
    assert [r["epoch"] for r in val_whole] == ["0", "1"]
    assert val_resumed == val_whole  # every logged val metric of every epoch (epoch 0 from the first attempt)
    tests = {k: v for k, v in whole.items() if k.startswith(("test/", "teacher/test"))}
    assert tests and tests == {k: v for k, v in resumed.items() if k.startswith(("test/", "teacher/test"))}
    assert resumed["epochs"] == 2


class RecordStepDraws(Callback):
    """Used by the DDP test below inside its rank processes: records the Mixup/CutMix draw of every training batch
    (peeked without consuming it) and a hash of torch's generator state at that moment, per rank."""

    def __init__(self, out: str) -> None:
        self.out, self.draws = Path(out), []

    def setup(self, trainer, pl_module, stage: str) -> None:
        mixup, draws = pl_module.mixup, self.draws

        def recording(images, target):
            state = np.random.get_state()
            lam, use_cutmix = mixup._params_per_batch()
            np.random.set_state(state)
            draws.append([float(lam), bool(use_cutmix), hashlib.sha256(torch.get_rng_state().numpy()).hexdigest()])
            return mixup(images, target)

        pl_module.mixup = recording

    def on_train_end(self, trainer, pl_module) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.draws))


def test_two_gloo_ranks_draw_their_own_mixup_and_masks(tmp_path, digits_teacher_file):
    args = ["experiment=quickstart", "augment=deit", f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0",
            *(a for a in FAST_DIGITS if not a.startswith("trainer.limit_train")), "trainer.limit_train_batches=2",
            "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0", "test=false", "strategy=ddp_cpu",
            "trainer.devices=2", "trainer.enable_progress_bar=false",
            "+callbacks.record._target_=test_stream.RecordStepDraws",
            f"+callbacks.record.out={tmp_path / 'draws'}", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "DEIT_TRAIN_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "deit_train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / "draws" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    for step in range(2):
        assert ranks[0][step][0] != ranks[1][step][0]  # Mixup/CutMix lambda
        assert ranks[0][step][2] != ranks[1][step][2]  # torch's stream: drop-path and SimMIM masks
    # and each is the (seed, epoch, batch, rank) draw
    mixup = instantiate(compose_config(["experiment=quickstart", "augment=deit"], tmp_path / "cfg").module.mixup)
    for rank, draws in enumerate(ranks):
        for step, (lam, use_cutmix, _) in enumerate(draws):
            seed_globals(step_seed(42, 0, step, rank))
            assert [float(x) for x in mixup._params_per_batch()] == [lam, float(use_cutmix)]
