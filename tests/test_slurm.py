"""Slurm on a real one-node local cluster (scripts/slurm_local_cluster.sh): sbatch template, requeue -> resume,
2-task srun DDP, a Hydra sweep through the submitit launcher, and Slurm's warning signal mid-epoch; plus the resume
choice itself (no Slurm needed). One file on purpose: under pytest-xdist's --dist loadfile one worker starts the
cluster and runs these tests one after another."""
import csv
import json
import re
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
    """A readable (minimal) Lightning training checkpoint at ``path`` with modification time ``mtime``: the resume
    passes over files it cannot read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "loops": {}}, path)
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


# ---- Slurm's own requeue path: the warning signal mid-epoch ---------------------------------------------------
# On the local cluster: the warning signal (SIGUSR1, as `#SBATCH --signal=SIGUSR1@90` sends
# it) reaches both DDP ranks and their loader workers mid-epoch; one checkpoint at the step where the ranks agreed,
# the job requeued and resumed in its run directory, and the same training as an uninterrupted run.
EPOCHS, BATCHES = 4, 6
SIGNAL_ARGS = [*(a for a in TINY if not a.startswith("trainer.limit_train_batches=")),
               f"trainer.limit_train_batches={BATCHES}", "strategy=ddp_cpu", "data.num_workers=2",
               "trainer.log_every_n_steps=1", "teacher.min_val_top1=0", f"trainer.max_epochs={EPOCHS}"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _submit(env, tmp_path, run_dir: Path, teacher: Path) -> str:
    """Two tasks on one node (one CPU each); --oversubscribe lets the reference run beside it."""
    submit = subprocess.run(
        ["sbatch", "--parsable", "--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1", "--oversubscribe",
         f"--output={tmp_path}/{run_dir.name}-%j.out", str(ROOT / "slurm" / "train.sbatch"), *SIGNAL_ARGS,
         f"teacher.checkpoint={teacher}", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return submit.stdout.strip().split(";")[0]


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _rows(run_dir: Path) -> list[dict[str, str]]:
    """metrics.csv's rows, each without its empty cells and the wall-clock throughput."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return [{k: v for k, v in row.items() if v and k != "train/throughput"} for row in csv.DictReader(handle)]


def _key(row: dict[str, str]) -> tuple:
    """What a row is: its epoch, step and which metrics it holds."""
    return row["epoch"], int(row["step"]), tuple(sorted(k for k in row if k not in ("epoch", "step")))


def test_sigusr1_mid_epoch_saves_once_requeues_and_resumes_exactly(slurm, tmp_path, digits_teacher_file):
    run_dir, reference_dir = tmp_path / "run", tmp_path / "uninterrupted"
    job = _submit(slurm, tmp_path, run_dir, digits_teacher_file)
    reference = _submit(slurm, tmp_path, reference_dir, digits_teacher_file)
    last = run_dir / "checkpoints" / "last.ckpt"
    _wait(last.is_file, 300, "the first finished epoch")
    steps_before = _checkpoint(last)["global_step"]
    subprocess.run(["scancel", "--signal=USR1", job], env=slurm, check=True)  # every process of the job step
    _wait(lambda: _job_state(slurm, job) == "PENDING", 120, "the job to requeue itself")

    # exactly one checkpoint, at a step inside an epoch after the signal; the CSV holds each row up to it once
    log = (tmp_path / f"run-{job}.out").read_text()
    hpc = sorted(run_dir.glob("hpc_ckpt_*.ckpt"))
    assert [p.name for p in hpc] == ["hpc_ckpt_1.ckpt"], log[-3000:]
    saved = _checkpoint(hpc[0])
    step = saved["global_step"]
    assert steps_before < step < EPOCHS * BATCHES and step % BATCHES != 0, step
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": step // BATCHES,
                                                                             "batches": step % BATCHES}]
    assert log.count("Slurm requeue signal: saved") == 1 and f"saved {hpc[0]} at step {step}; requeued job {job}" in log
    before = _rows(run_dir)
    assert max(int(r["step"]) for r in before if "train/lr" in r) == step - 1
    assert len({_key(r) for r in before}) == len(before)

    _scontrol(slurm, "update", f"JobId={job}", "StartTime=now")  # Slurm holds a requeued job ~2 minutes
    final = _wait(lambda: (s := _job_state(slurm, job)) in ENDED and s, 300, "the resumed job", poll_s=1)
    log = (tmp_path / f"run-{job}.out").read_text()
    assert final == "COMPLETED", log[-3000:]
    assert f"job {job} (restart 1)" in log and f"Restoring states from the checkpoint path at {hpc[0]}" in log
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs"] == EPOCHS

    _wait(lambda: _job_state(slurm, reference) in ENDED, 300, "the uninterrupted job", poll_s=1)
    expected = json.loads((reference_dir / "results.json").read_text())
    # every row once; the same rows, value for value, as the uninterrupted run's -- but the interrupted epoch's
    # train/*_epoch means, which cover the batches after the restart only (Lightning keeps no running means)
    rows, reference_rows = _rows(run_dir), _rows(reference_dir)
    assert len({_key(r) for r in rows}) == len(rows), Counter(_key(r) for r in rows).most_common(3)
    interrupted_epoch = str(step // BATCHES)
    partial = [r for r in rows if r["epoch"] == interrupted_epoch and any(k.endswith("_epoch") for k in r)]
    assert len(partial) == 1
    assert sorted(map(_key, rows)) == sorted(map(_key, reference_rows))
    by_key = {_key(r): r for r in reference_rows}
    assert [r for r in rows if r is not partial[0] and r != by_key[_key(r)]] == []
    compared = [k for k in expected if k.startswith(("test/", "teacher/test", "last_epoch/", "best/"))]
    assert compared and {k: results[k] for k in compared} == {k: expected[k] for k in compared}
    assert Path(results["best_checkpoint"]).name == Path(expected["best_checkpoint"]).name
    assert re.search(r"resuming from .*hpc_ckpt_1\.ckpt", log)


# ---- a hyperparameter search whose trials are Slurm jobs ------------------------------------------------------
def test_search_runs_two_trials_as_one_slurm_array_reporting_to_one_study(slurm, tmp_path, digits_teacher_file):
    import optuna
    from optuna.trial import TrialState

    sweep_dir = tmp_path / "search"
    proc = subprocess.run(
        [sys.executable, "-m", "deit_train", "-m", "hparams_search=quickstart_distill", "hydra/launcher=slurm_cpu",
         f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
         "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra.sweeper.pruner=null", *TINY,
         f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "trainer.max_epochs=2"],
        cwd=ROOT, env=slurm, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trials = optuna.load_study(study_name="quickstart_distill", storage=f"sqlite:///{sweep_dir}/optuna.db").get_trials()
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    for trial in trials:  # each job found the study in the shared storage and reported its epochs to it
        run_dir = sweep_dir / str(trial.number)
        assert trial.user_attrs["run_dir"] == str(run_dir) and sorted(trial.intermediate_values) == [0, 1]
        assert trial.value == json.loads((run_dir / "results.json").read_text())["best/val/top1"]
    # the two trials were launched together: the two tasks of one Slurm array
    jobs = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(jobs) == 2 and len({job.split("_")[0] for job in jobs}) == 1, jobs
