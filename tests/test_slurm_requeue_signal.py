"""Slurm's own requeue path on the local cluster: the warning signal (SIGUSR1, as `#SBATCH --signal=SIGUSR1@90`
sends it) reaches both DDP ranks and their loader workers mid-epoch; one checkpoint at the step where the ranks
agreed, the job requeued and resumed in its run directory, and the same training as an uninterrupted run."""
import csv
import json
import re
import subprocess
from collections import Counter
from pathlib import Path

import torch

from conftest import ROOT
from test_slurm import TINY, _job_state, _scontrol, _wait, slurm  # noqa: F401 (the fixture)

EPOCHS, BATCHES = 4, 6
ARGS = [*(a for a in TINY if not a.startswith("trainer.limit_train_batches=")), f"trainer.limit_train_batches={BATCHES}",
        "strategy=ddp_cpu", "data.num_workers=2",
        "trainer.log_every_n_steps=1", "teacher.min_val_top1=0", f"trainer.max_epochs={EPOCHS}"]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"}


def _submit(env, tmp_path, run_dir: Path, teacher: Path) -> str:
    """Two tasks on one node (one CPU each); --oversubscribe lets the reference run beside it."""
    submit = subprocess.run(
        ["sbatch", "--parsable", "--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1", "--oversubscribe",
         f"--output={tmp_path}/{run_dir.name}-%j.out", str(ROOT / "slurm" / "train.sbatch"), *ARGS,
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
