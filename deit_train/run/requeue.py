"""Slurm's warning signal before a time limit or a preemption: save one checkpoint where all ranks agree, requeue
the job, stop.

Slurm sends the requeue signal (``#SBATCH --signal=SIGUSR1@90``, ``scancel --signal=USR1``) to every process of
the job step: each DDP rank and each of its forked data-loader workers, which inherit the rank's Python signal
handler. Lightning's own handler saves ``hpc_ckpt_<n>.ckpt`` inside the handler, so a worker's stale copy of the
trainer saved (the newest file, at the worker's fork-time step) and requeued too, wrote its copy of the buffered
CSV rows, and under DDP each rank ran the checkpoint's barrier wherever the signal caught it.

Here the handler only notes the signal, and only in the process that installed it. At the end of each training
batch the ranks agree (one all-reduce) whether any of them was signalled; if so, all save the same step
(``<run dir>/hpc_ckpt_<n>.ckpt``, replacing an older one); at the start of the next batch the loggers write
their rows up to that step and every rank stops; then rank 0 requeues the job. The requeued job resumes from that
checkpoint in the same run directory (:func:`deit_train.run.resume.resume_checkpoint`) and, with the stream's
resumable loader, continues the epoch at the next batch.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from deit_train.run.launch import is_global_zero

log = logging.getLogger(__name__)

HPC_CHECKPOINT_GLOB = "hpc_ckpt_*.ckpt"  # Lightning's name, which resume_checkpoint looks for


class Requeued(SystemExit):
    """Raised by every rank once the requeue checkpoint is saved: the process ends (status 0), without testing.

    The entry point calls :meth:`requeue` after ``trainer.fit`` has torn down (loader workers stopped), so that
    Slurm's SIGTERM to the requeued job finds nothing left to interrupt."""

    def __init__(self, checkpoint: Path, step: int) -> None:
        super().__init__(0)
        self.checkpoint, self.step = checkpoint, step

    def requeue(self, run_dir: str | Path) -> None:
        """``scontrol requeue`` this job, from global rank 0 (the others only stop)."""
        if not is_global_zero():
            return
        job = slurm_job_id()
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if result.returncode == 0:
            log.info("Slurm requeue signal: saved %s at step %d; requeued job %s, which resumes from it",
                     self.checkpoint, self.step, job)
        else:
            log.warning("Slurm requeue signal: saved %s at step %d, but `scontrol requeue %s` failed (%s): submit "
                        "the job again with hydra.run.dir=%s to resume from it", self.checkpoint, self.step, job,
                        (result.stderr or result.stdout).strip(), run_dir)


def slurm_job_id(environ: Mapping[str, str] = os.environ) -> str:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` for an array task, else the job id."""
    array = environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array}_{environ['SLURM_ARRAY_TASK_ID']}" if array else environ["SLURM_JOB_ID"]


def next_hpc_checkpoint(run_dir: str | Path) -> Path:
    """``hpc_ckpt_<n + 1>.ckpt`` after the highest ``n`` in ``run_dir``."""
    numbers = [int(n) for p in Path(run_dir).glob(HPC_CHECKPOINT_GLOB)
               if (n := p.stem.rsplit("_", 1)[-1]).isdigit()]
    return Path(run_dir) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class SlurmRequeue(Callback):
    """Handles Slurm's requeue signal at a batch boundary all ranks share (see the module docstring).

    Active where Lightning's own auto-requeue would be (a ``SLURMEnvironment`` with ``auto_requeue``); it installs
    its handler before Lightning registers its own, which Lightning then leaves out. A signal during validation is
    handled at the end of the next training batch; the last batch of an epoch (then validation and the epoch's
    ``last.ckpt`` follow) and a batch inside gradient accumulation are not save points either.
    """

    def __init__(self) -> None:
        self._signum: int | None = None
        self._previous = None
        self._pid: int | None = None
        self._signalled = False
        self._saved: tuple[Path, int] | None = None

    # ---- the signal ----------------------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        environment = trainer._accelerator_connector.cluster_environment  # what Lightning's signal connector reads
        if (not isinstance(environment, SLURMEnvironment) or not environment.auto_requeue or self._pid is not None
                or threading.current_thread() is not threading.main_thread()):
            return
        self._signum, self._pid = environment.requeue_signal, os.getpid()
        self._previous = signal.signal(self._signum, self._note)

    def _note(self, signum, frame) -> None:
        if os.getpid() == self._pid:  # a forked loader worker gets the signal too: it has nothing to save
            self._signalled = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._pid == os.getpid():
            signal.signal(self._signum, self._previous)
        self._pid = None

    # ---- save, requeue, stop -------------------------------------------------------------------------------
    @staticmethod
    def _save_point(trainer: L.Trainer, batch_idx: int) -> bool:
        """Whether the state after this batch is one a restart continues exactly from (same on every rank)."""
        stepped = (batch_idx + 1) % trainer.accumulate_grad_batches == 0
        last_of_epoch = batch_idx + 1 >= trainer.num_training_batches
        finished = trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step
        return stepped and not last_of_epoch and not finished

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        if self._pid is None or self._saved is not None or not self._save_point(trainer, batch_idx):
            return
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        path = next_hpc_checkpoint(trainer.default_root_dir)
        earlier = list(Path(trainer.default_root_dir).glob(HPC_CHECKPOINT_GLOB))
        trainer.save_checkpoint(path)  # every rank: rank 0 writes (atomically), all wait for it
        if trainer.is_global_zero:
            for old in earlier:  # superseded by this one
                old.unlink(missing_ok=True)
        self._saved = (path, trainer.global_step)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._saved is None:
            return
        for logger in trainer.loggers:  # the rows up to the saved step, once (the requeued job logs the rest)
            logger.save()
        raise Requeued(*self._saved)
