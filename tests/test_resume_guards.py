"""A resumed run is the same experiment or refuses; a diverging run stops before its next checkpoint, keeping the last
good one."""
import csv
import json
import math
import shutil

import pytest
import torch

from conftest import FAST_DIGITS, main_in_process, run_cli_in_process
from deit_train.errors import ConfigError
from deit_train.eval import evaluate

# lr = 1.6e-2 x 16 / 512 = 5e-4; no warmup, so the lr of optimizer step s of a T-step run is the cosine's
PEAK, MIN_LR, STEPS_PER_EPOCH = 1.6e-2 * 16 / 512, 1e-5, 4


def _args(teacher, *extra):
    return ["experiment=quickstart", f"teacher.checkpoint={teacher}", "teacher.min_val_top1=0", "trainer.max_epochs=1", *FAST_DIGITS,
            "optim.warmup_epochs=0", "trainer.log_every_n_steps=1", *extra]


def _cosine(step: int, total: int) -> float:
    return MIN_LR + 0.5 * (PEAK - MIN_LR) * (1 + math.cos(math.pi * step / total))


def _lrs(run_dir):
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [float(r["train/lr"]) for r in csv.DictReader(handle) if r.get("train/lr")]


def _last_line(proc) -> str:
    return [line for line in proc.stderr.splitlines() if line.strip()][-1]


@pytest.fixture
def one_epoch_run(trained_run, digits_teacher_file):
    """A one-epoch quickstart run (4 optimizer steps): the session's, copied per test that changes it."""
    assert trained_run.args == _args(digits_teacher_file, "trainer.limit_test_batches=1.0")
    return trained_run.dir


def test_eval_reproduces_the_runs_own_test_metrics(one_epoch_run):
    results = json.loads((one_epoch_run / "results.json").read_text())
    metrics = evaluate(results["best_checkpoint"])  # the data set from the checkpoint's stored config
    for key in ("test/top1", "test/top5", "test/top1_cls", "test/top1_dist"):
        assert metrics[key] == pytest.approx(results[key], abs=1e-6), key
    assert set(evaluate(results["best_checkpoint"], split="val")) == {k.replace("test/", "val/") for k in metrics}
    with pytest.raises(ConfigError, match="^split=train is not one of test, val"):
        evaluate(results["best_checkpoint"], split="train")


def test_rerun_with_another_config_is_refused_and_the_stored_config_kept(one_epoch_run, digits_teacher_file, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(one_epoch_run, run)
    stored = (run / ".hydra" / "config.yaml").read_bytes()
    last = (run / "checkpoints" / "last.ckpt").read_bytes()
    proc = run_cli_in_process(_args(digits_teacher_file, "distill=soft", "trainer.max_epochs=2"), run, tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert _last_line(proc).startswith(f"error: run directory {run} holds a run with another config "
                                       "(distill.distill_type: hard -> soft, ")
    assert (run / ".hydra" / "config.yaml").read_bytes() == stored  # the run's record, byte for byte
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == last


def test_checkpoint_of_another_architecture_is_one_line_from_its_stored_config(one_epoch_run, digits_teacher_file,
                                                                              tmp_path):
    ckpt = one_epoch_run / "checkpoints" / "last.ckpt"
    proc = run_cli_in_process(_args(digits_teacher_file, f"ckpt_path={ckpt}", "model.hidden_size=48"),
                              tmp_path / "other", tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert _last_line(proc) == (f"error: ckpt_path={ckpt}: checkpoint was trained with model.hidden_size=32, this run "
                                "asks for 48: resume with the checkpoint's model settings (or use model.init_from to "
                                "fine-tune)")


def test_resume_by_ckpt_path_continues_in_its_run_dir_on_the_extended_schedule(one_epoch_run, digits_teacher_file,
                                                                              tmp_path):
    run = tmp_path / "outputs" / "quickstart" / "first"
    shutil.copytree(one_epoch_run, run)
    stored = (run / ".hydra" / "config.yaml").read_bytes()
    # as a user types it: no hydra.run.dir; a new run would go to a timestamped dir under DEIT_TRAIN_OUTPUTS
    env = {"DEIT_TRAIN_CACHE": str(tmp_path / "cache"), "DEIT_TRAIN_OUTPUTS": str(tmp_path / "outputs")}
    proc = main_in_process([*_args(digits_teacher_file, "trainer.max_epochs=3"),
                            f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "trainer.enable_progress_bar=false"], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "outputs" / "quickstart").iterdir()) == ["first"]  # no new run dir
    assert (run / ".hydra" / "config.yaml").read_bytes() == stored
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 3 and results["best_checkpoint"].startswith(str(run / "checkpoints"))
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        val_top1 = {int(r["epoch"]): float(r["val/top1"]) for r in csv.DictReader(handle) if r.get("val/top1")}
    assert sorted(val_top1) == [0, 1, 2]  # the curve continues in the same CSV
    assert results["best/val/top1"] == pytest.approx(max(val_top1.values()))  # the resumed run knows epoch 0's
    assert results["last_epoch/val/top1"] == pytest.approx(val_top1[2])
    assert results["test_split_is_val"] is False  # the digits have their own test split
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3 * STEPS_PER_EPOCH
    # train/lr is logged after the scheduler's update, i.e. the lr of the next step. Epoch 0 followed the 4-step
    # cosine; epochs 1-2 continue the 12-step cosine from step 4 (before: the restored 4-step one, min_lr throughout)
    lrs = _lrs(run)
    assert len(lrs) == 12
    assert lrs[:4] == pytest.approx([_cosine(s, 4) for s in range(1, 5)], rel=1e-6)
    assert lrs[4:] == pytest.approx([_cosine(s, 12) for s in range(5, 13)], rel=1e-6)
    assert lrs[4] > 10 * MIN_LR
    assert ("lr schedule on resume: optimizer updates in all 4 -> 12; the lr continues at update 4 of 12 (epoch 1) "
            "of this run's schedule") in (run / "train.log").read_text()


def test_a_non_finite_loss_stops_before_a_checkpoint_and_keeps_the_last_good_one(one_epoch_run,
                                                                                 digits_teacher_file, tmp_path):
    run = tmp_path / "diverging"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(one_epoch_run / "checkpoints" / "last.ckpt", run / "checkpoints" / "last.ckpt")  # resumed from
    good = (run / "checkpoints" / "last.ckpt").read_bytes()
    proc = run_cli_in_process(_args(digits_teacher_file, "trainer.max_epochs=2", "optim.base_lr=1e30"), run,
                              tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = _last_line(proc)
    assert line.startswith("error: the training loss is nan at epoch 1, step ") or \
        line.startswith("error: the training loss is inf at epoch 1, step "), line
    assert "non-finite class head logits, distillation head logits" in line and "last good checkpoint is kept" in line
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == good
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not (run / "results.json").exists()
