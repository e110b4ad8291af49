"""Slurm on a real one-node local cluster (scripts/slurm_local_cluster.sh): sbatch template, requeue -> resume,
2-task srun DDP, and a Hydra sweep through the submitit launcher. Plus the resume choice itself (no Slurm needed)."""
import csv
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import ROOT
from deit_train.run.console import SACCT_EXPLANATION
from deit_train.run.launch import rank_overrides
from deit_train.run.resume import resume_checkpoint

# quickstart's models made tiny: each epoch is a few steps, so the test is about control flow, not accuracy
TINY = ["experiment=quickstart", "model.image_size=16", "model.hidden_size=32", "model.num_hidden_layers=1",
        "model.num_attention_heads=2", "data.batch_size=16", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "trainer.enable_progress_bar=false"]


# ---- which checkpoint a restarted run picks (no Slurm) -------------------------------------------------------
def _trainer(run_dir: Path) -> L.Trainer:
    return L.Trainer(default_root_dir=run_dir, logger=False,
                     callbacks=[ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True)])


def _touch(path: Path, mtime: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"ckpt")
    os.utime(path, (mtime, mtime))
    return path


def test_resume_picks_newest_of_last_and_hpc_checkpoints(tmp_path):
    trainer = _trainer(tmp_path)
    assert resume_checkpoint(trainer, None) is None  # a fresh run starts from scratch

    last = _touch(tmp_path / "checkpoints" / "last.ckpt", 1_000)
    assert resume_checkpoint(trainer, None) == str(last)
    hpc = _touch(tmp_path / "hpc_ckpt_1.ckpt", 2_000)  # SIGUSR1 before the time limit, after the last epoch end
    assert resume_checkpoint(trainer, None) == str(hpc)
    _touch(last, 3_000)  # later epochs finished after that requeue: Lightning alone would go back to hpc_ckpt_1
    assert resume_checkpoint(trainer, None) == str(last)
    assert resume_checkpoint(trainer, "/elsewhere/epoch3.ckpt") == "/elsewhere/epoch3.ckpt"


def test_only_rank_zero_writes_hydra_files_under_srun():
    assert rank_overrides({}) == []  # not under Slurm
    assert rank_overrides({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == []
    assert rank_overrides({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == []  # sbatch script itself
    assert rank_overrides({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == ["hydra/job_logging=stdout"]


# ---- the local cluster (conftest.slurm_cluster: started once per test session) ------------------------------
@pytest.fixture
def slurm(slurm_cluster):
    """Environment of the session's running one-node Slurm (the name this module's tests, and modules importing
    it, use)."""
    return slurm_cluster


def _scontrol(env, *args) -> str:
    return subprocess.run(["scontrol", *args], env=env, capture_output=True, text=True, check=True).stdout


def _job_state(env, job_id: str) -> str:
    out = _scontrol(env, "show", "job", job_id)
    return out.split("JobState=", 1)[1].split()[0]


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.25):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _ckpt_epoch(path: Path) -> int:
    """Epochs completed in a checkpoint (-1 while there is none yet)."""
    if not path.is_file():
        return -1
    return torch.load(path, map_location="cpu", weights_only=False)["epoch"]


def _val_epochs(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle) if row.get("val/top1")]


def _sbatch_train(env, tmp_path, run_dir: Path, *args) -> str:
    submit = subprocess.run(
        ["sbatch", "--parsable", "--gres=none", "--ntasks-per-node=1", "--cpus-per-task=1",
         f"--output={tmp_path}/slurm-%j.out", str(ROOT / "slurm" / "train.sbatch"), *TINY, *args,
         f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return submit.stdout.strip().split(";")[0]


def test_sbatch_requeue_resumes_in_same_run_dir(slurm, tmp_path, digits_teacher_file):
    run_dir, epochs = tmp_path / "run", 10
    args = [f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", f"trainer.max_epochs={epochs}"]
    job = _sbatch_train(slurm, tmp_path, run_dir, *args)
    # the same training uninterrupted, beside it (one CPU each): the requeued run must end exactly where it does
    reference = _sbatch_train(slurm, tmp_path, tmp_path / "uninterrupted", *args)
    last = run_dir / "checkpoints" / "last.ckpt"
    _wait(lambda: _ckpt_epoch(last) >= 1, 240, "two finished epochs")  # epoch index 1 done -> 2 epochs

    _scontrol(slurm, "requeue", job)
    # Slurm holds a requeued job for ~2 minutes; release it at once (a preempted job waits for its resources)
    _wait(lambda: _job_state(slurm, job) == "PENDING", 60, "the requeued job to pend")
    done_before = _ckpt_epoch(last) + 1  # epochs the killed attempt completed
    _scontrol(slurm, "update", f"JobId={job}", "StartTime=now")
    final = _wait(lambda: (s := _job_state(slurm, job)) in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"} and s,
                  300, "the resumed job to finish", poll_s=1)
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert final == "COMPLETED", log[-3000:]

    assert 1 < done_before < epochs, "requeued after training had finished: nothing to resume"
    assert f"job {job} (restart 1)" in log
    assert f"Restoring states from the checkpoint path at {last}" in log
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == epochs and "test/top1" in results
    # every epoch validated; the epochs before the requeue exactly once (kept in metrics.csv, not re-trained)
    seen = Counter(_val_epochs(run_dir))
    assert sorted(seen) == list(range(epochs))
    assert all(seen[e] == 1 for e in range(done_before))
    assert _ckpt_epoch(last) == epochs - 1
    # the deterministic stream: the requeued run ends exactly where an uninterrupted one does
    _wait(lambda: _job_state(slurm, reference) in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 300,
          "the uninterrupted job to finish", poll_s=1)
    uninterrupted = json.loads((tmp_path / "uninterrupted" / "results.json").read_text())
    tests = {k: v for k, v in uninterrupted.items() if k.startswith(("test/", "teacher/test"))}
    assert tests and tests == {k: v for k, v in results.items() if k.startswith(("test/", "teacher/test"))}


def test_srun_two_task_ddp_on_cpu(slurm, tmp_path, digits_teacher_file):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        ["srun", "--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", sys.executable, "-m", "deit_train", *TINY,
         f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "trainer.max_epochs=1", "strategy=ddp_cpu",
         "trainer.devices=2", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    hparams = yaml.safe_load((run_dir / "csv" / "hparams.yaml").read_text())
    # two Slurm tasks = two DDP ranks: global batch 16 x 2 and the lr scaled to it
    assert hparams["optim/global_batch"] == 32
    assert hparams["optim/lr"] == pytest.approx(1.6e-2 * 32 / 512)
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 1
    assert "SLURM auto-requeueing enabled" in proc.stdout + proc.stderr  # Lightning took rank/world from Slurm
    # rank 0 alone writes the run config, the log file and the summary
    assert proc.stdout.count("test accuracy") == 1
    assert [p.name for p in run_dir.glob("*.log")] == ["train.log"] and (run_dir / ".hydra" / "config.yaml").is_file()


def test_submitit_sweep_runs_each_job_in_its_own_dir(slurm, tmp_path, digits_teacher_file):
    """The README's CPU-cluster sweep line (hydra/launcher=slurm_cpu), one CPU per job so both run at once."""
    sweep_dir = tmp_path / "sweep"
    proc = subprocess.run(
        [sys.executable, "-m", "deit_train", "-m", "hydra/launcher=slurm_cpu", f"hydra.sweep.dir={sweep_dir}",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
         *TINY, f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "trainer.max_epochs=1", "distill=none,hard"],
        cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # this cluster has no accounting: one line about sacct instead of three per poll
    driver = proc.stdout + proc.stderr
    assert "Bypassing sacct error" not in driver and driver.count(SACCT_EXPLANATION) == 1
    logs = sorted(sweep_dir.glob("[0-9]*/*.log"))
    assert len(logs) == 2
    for log in logs:  # each job's torch uses the one CPU Slurm granted it
        assert "Slurm granted 1 CPUs per task: torch uses 1 threads" in log.read_text(), log
    jobs = {}
    for job_dir in sorted(p for p in sweep_dir.iterdir() if p.name.isdigit()):
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        jobs[next(o for o in overrides if o.startswith("distill="))] = json.loads((job_dir / "results.json").read_text())
    assert set(jobs) == {"distill=none", "distill=hard"}
    # the CLS-only student has no distillation head and no teacher metrics; the distilled one has both
    assert "teacher/test_top1" not in jobs["distill=none"] and "test/top1_dist" not in jobs["distill=none"]
    assert "teacher/test_top1" in jobs["distill=hard"] and "test/top1_dist" in jobs["distill=hard"]
    assert jobs["distill=none"]["run_dir"] != jobs["distill=hard"]["run_dir"]
