"""A run requeued on another allocation (another world size) keeps every epoch at its lr of the new schedule: the
position is completed epochs x the new updates per epoch, as timm's train.py resumes, not the restored step. The
schedule it must follow is written out by hand (conftest.cosine_lr), as an uninterrupted two-process run takes it."""
from __future__ import annotations

import csv
from collections import defaultdict

import pytest

from conftest import FAST_DIGITS, cosine_lr, run_cli, run_cli_in_process

# digits: 1257 training images, 16 a batch: 78 batches on 1 process, 39 on 2; a tenth of them is 7 and 3 updates
ARGS = ["experiment=quickstart", "teacher.min_val_top1=0", *(a for a in FAST_DIGITS if not a.startswith("trainer.limit_train")),
        "trainer.limit_train_batches=0.1", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
        "optim.warmup_epochs=1", "test=false", "trainer.num_sanity_val_steps=0"]
MIN_LR = 1e-5
TWO = ["strategy=ddp_cpu", "trainer.devices=2"]


def _lrs_by_epoch(run_dir) -> dict[int, list[float]]:
    """train/lr of every update (logged after the scheduler's update: the lr of the next one), per epoch."""
    out = defaultdict(list)
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("train/lr"):
                out[int(row["epoch"])].append(float(row["train/lr"]))
    return dict(out)


def test_a_one_process_checkpoint_resumed_on_two_processes_follows_the_two_process_schedule(tmp_path,
                                                                                             digits_teacher_file):
    args = [*ARGS, f"teacher.checkpoint={digits_teacher_file}"]
    first = run_cli_in_process([*args, "trainer.max_epochs=2"], tmp_path / "one", tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_cli([*args, *TWO, "trainer.max_epochs=4", f"ckpt_path={tmp_path / 'one/checkpoints/last.ckpt'}"],
                      tmp_path / "requeued", tmp_path / "cache")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert {e: len(v) for e, v in _lrs_by_epoch(tmp_path / "one").items()} == {0: 7, 1: 7}
    requeued = _lrs_by_epoch(tmp_path / "requeued")
    assert {e: len(v) for e, v in requeued.items()} == {2: 3, 3: 3}
    # the uninterrupted two-process run's schedule, by hand: 4 epochs x 3 updates, 1 epoch of warmup, peak lr
    # quickstart's base_lr 1.6e-2 x global batch 32 / 512; every update of the resumed epochs is at its lr (logged
    # after the update: the lr of the next one)
    whole = [cosine_lr(update, total=12, warmup=3, peak=1.6e-2 * 32 / 512, warmup_lr=1e-6, min_lr=MIN_LR)
             for update in range(1, 13)]
    assert requeued[2] + requeued[3] == pytest.approx(whole[6:], rel=1e-6)
    assert requeued[3][-1] == pytest.approx(MIN_LR, rel=1e-6)  # and the cosine ends where it should
    assert requeued[2][0] > 10 * MIN_LR  # (the restored step 14 of a 12-update schedule put it at min_lr throughout)
    log = (tmp_path / "requeued" / "train.log").read_text()
    assert ("lr schedule on resume: world size 1 -> 2, batches per epoch 7 -> 3, optimizer updates per epoch 7 -> 3, "
            "optimizer updates in all 14 -> 12; the lr continues at update 6 of 12 (epoch 2)") in log
