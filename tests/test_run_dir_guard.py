"""The run-directory guard compares the values a run used, resolved: ``data.seed: ${seed}`` and
``teacher.checkpoint: ${paths.cache_dir}/...`` read the same for every seed and every cache directory. The runs
are in-process: the guard is the CLI's own preflight, and its exit status and last line are what a process shows."""
from __future__ import annotations

import shutil

from omegaconf import OmegaConf

from conftest import FAST_DIGITS, run_cli_in_process

ARGS = ["experiment=quickstart", "teacher.min_val_top1=0", *FAST_DIGITS, "trainer.max_epochs=1",
        "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false", "trainer.num_sanity_val_steps=0"]


def _cache(tmp_path, name, teacher_file):
    """A cache directory holding the quickstart teacher where its config looks for it (no bootstrap)."""
    cache = tmp_path / name
    (cache / "teachers").mkdir(parents=True)
    shutil.copy(teacher_file, cache / "teachers" / "regnetx_002_digits.pth")
    return cache


def _snapshot(run):
    return {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}


def test_another_seed_or_cache_directory_in_the_same_run_dir_is_refused(tmp_path, digits_teacher_file):
    run, cache = tmp_path / "run", _cache(tmp_path, "cache", digits_teacher_file)
    first = run_cli_in_process(ARGS, run, cache)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(run)

    other_seed = run_cli_in_process([*ARGS, "seed=1"], run, cache)
    assert other_seed.returncode == 2 and "Traceback" not in other_seed.stderr, other_seed.stderr[-3000:]
    assert other_seed.stderr.strip().splitlines()[-1].startswith(
        f"error: run directory {run} holds a run with another config (data.seed: 42 -> 1")

    moved = _cache(tmp_path, "elsewhere", digits_teacher_file)  # DEIT_TRAIN_CACHE points elsewhere
    other_cache = run_cli_in_process(ARGS, run, moved)
    assert other_cache.returncode == 2 and "Traceback" not in other_cache.stderr, other_cache.stderr[-3000:]
    assert (f"teacher.checkpoint: {cache}/teachers/regnetx_002_digits.pth -> {moved}/teachers/regnetx_002_digits.pth"
            in other_cache.stderr.strip().splitlines()[-1])
    assert _snapshot(run) == before  # nothing written into the run directory by either refusal


def test_a_refused_first_start_leaves_no_record_so_the_corrected_command_starts_there(tmp_path,
                                                                                      digits_teacher_file):
    run, cache = tmp_path / "run", _cache(tmp_path, "cache", digits_teacher_file)
    typo = run_cli_in_process([*ARGS, "optim.base_lr=-1"], run, cache)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1].startswith("error: optim.base_lr=-1 is")
    assert not (run / ".hydra" / "config.yaml").exists()  # the refused start's record is taken back

    fixed = run_cli_in_process(ARGS, run, cache)  # was refused: "holds a run with another config (... base_lr: -1"
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert OmegaConf.load(run / ".hydra" / "config.yaml").module.optim.base_lr > 0  # the corrected start's record
    before = _snapshot(run)

    other = run_cli_in_process([*ARGS, "optim.base_lr=-1"], run, cache)  # a record with a checkpoint stays
    assert other.returncode == 2 and _snapshot(run) == before
