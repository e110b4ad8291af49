"""What Lightning/Hydra users expect: a bare run says what to run, debug= configs, trainer flags without `+`,
one line for a GPU config without a GPU, CSV kept next to W&B."""
from __future__ import annotations

import csv
import json
import sys

import pytest
import torch

from conftest import FAST_DIGITS, compose_config
from deit_train.run.config import experiment_names
from deit_train.run.environment import threads_from_slurm
from deit_train.errors import ConfigError
from deit_train.train import main, train


def run_in_process(argv: list[str], cwd, monkeypatch) -> int:
    """``python -m deit_train argv`` in this process (Hydra parses sys.argv); returns the exit status."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["deit_train", *argv])
    try:
        main()
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def test_bare_run_stops_with_one_line_listing_the_experiments(tmp_path, monkeypatch, capsys):
    assert run_in_process([], tmp_path, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no experiment chosen") and "\n" not in err
    assert list(tmp_path.rglob("train.log")) and not list(tmp_path.rglob("config.yaml"))  # no record of it left
    assert all(name in err for name in experiment_names()) and "quickstart" in experiment_names()
    assert not (tmp_path / "outputs" / "train").exists() or not any((tmp_path / "outputs" / "train").rglob("*.ckpt"))


def test_fast_dev_run_never_trains_the_cached_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEIT_TRAIN_CACHE", str(tmp_path / "cache"))  # no teacher cached yet
    status = run_in_process(["experiment=quickstart", "trainer.fast_dev_run=true"], tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip()
    assert status == 2 and err.startswith("error: trainer.fast_dev_run=true would also train the teacher")
    assert not list((tmp_path / "cache").rglob("*.pth"))


def test_bad_teacher_recipe_override_is_one_line_before_anything_trains(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DEIT_TRAIN_CACHE", str(tmp_path / "cache"))  # no teacher cached yet
    status = run_in_process(["experiment=quickstart", 'teacher_recipe_overrides=["trainer.max_epochz=3"]'], tmp_path,
                            monkeypatch)
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err
    assert err == ("error: teacher_recipe_overrides=['trainer.max_epochz=3'] do not apply to "
                   "experiment=quickstart_teacher: Could not override 'trainer.max_epochz'. Key 'max_epochz' is not "
                   "in struct")
    assert not list((tmp_path / "cache").rglob("*.pth")) and not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_trainer_without_gpu_is_one_line(tmp_path, digits_teacher_file):
    cfg = compose_config(["experiment=quickstart", "trainer=gpu", f"teacher.checkpoint={digits_teacher_file}"],
                         tmp_path)
    with pytest.raises(ConfigError, match=r"^trainer.accelerator=gpu but no GPU is visible .*with trainer=cpu$"):
        train(cfg)
    assert not (tmp_path / "checkpoints").exists()


def test_lightning_debug_flags_without_plus_and_debug_configs(tmp_path):
    assert compose_config(["trainer.fast_dev_run=true"], tmp_path).trainer.fast_dev_run is True
    assert compose_config(["trainer.overfit_batches=2", "trainer.profiler=simple"], tmp_path).trainer.profiler == "simple"
    fdr = compose_config(["experiment=quickstart", "debug=fdr"], tmp_path)
    assert (fdr.trainer.fast_dev_run, fdr.trainer.accelerator, fdr.task_name) == (True, "cpu", "debug")
    assert fdr.trainer.detect_anomaly is True and fdr.data.num_workers == 0
    overfit = compose_config(["experiment=deit_tiny_distill", "debug=overfit"], tmp_path)
    assert (overfit.trainer.overfit_batches, overfit.trainer.accelerator) == (3, "cpu")  # over the preset's gpu
    assert compose_config(["debug=profiler"], tmp_path).trainer.profiler == "simple"


def test_debug_limit_runs_short_epochs(tmp_path, digits_teacher_file):
    overrides = [o for o in FAST_DIGITS if not o.startswith("trainer.limit_")]
    cfg = compose_config(["experiment=quickstart", "debug=limit", f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0",
                          *overrides, "trainer.enable_progress_bar=false", "trainer.max_epochs=1",
                          "trainer.detect_anomaly=false"], tmp_path)  # 1 of its 3 epochs; anomaly checks are slow
    assert compose_config(["debug=limit"], tmp_path).trainer.max_epochs == 3
    results = train(cfg)
    assert results["epochs"] == 1 and "test/top1" in results
    with open(tmp_path / "csv" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({int(r["epoch"]) for r in rows if r.get("val/top1")}) == [0]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5  # limit_train_batches=5
    assert json.loads((tmp_path / "results.json").read_text())["epochs"] == 1


def test_wandb_logger_keeps_the_csv_log(tmp_path):
    loggers = compose_config(["logger=wandb"], tmp_path).logger
    assert list(loggers) == ["csv", "wandb"]
    assert loggers.csv._target_ == "deit_train.run.loggers.ResumableCSVLogger"
    assert list(compose_config(["logger=wandb", "~logger.csv"], tmp_path).logger) == ["wandb"]


def test_threads_follow_slurm_cpus_per_task(monkeypatch):
    before = torch.get_num_threads()
    try:
        environ = {}
        assert threads_from_slurm(environ) is None and environ == {}  # outside Slurm: untouched
        environ = {"SLURM_CPUS_PER_TASK": "1"}
        assert threads_from_slurm(environ) == 1
        assert torch.get_num_threads() == 1 and environ["OMP_NUM_THREADS"] == "1"
        environ = {"SLURM_CPUS_PER_TASK": "4", "OMP_NUM_THREADS": "2"}  # an explicit OMP_NUM_THREADS wins
        assert threads_from_slurm(environ) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_debug_fdr_runs_one_batch_and_writes_no_checkpoint(tmp_path, digits_teacher_file):
    cfg = compose_config(["experiment=quickstart", "debug=fdr", f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0",
                          *FAST_DIGITS, "trainer.enable_progress_bar=false"], tmp_path)
    results = train(cfg)
    assert "test/top1" in results and results["best_checkpoint"] == ""  # Lightning's fast dev run saves nothing
    assert not (tmp_path / "checkpoints").exists()
