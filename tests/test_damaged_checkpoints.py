"""Damaged files at the edges of resume and import: one line naming the file and the option, never torch's zip-reader
traceback; the automatic resume falls back to the newest readable checkpoint of the run and says so."""
from __future__ import annotations

import json
import os
import shutil

from conftest import run_cli_in_process


def _lines(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def _copy_with_damaged_last(trained_run, tmp_path):
    """The session's one-epoch run, copied, its last.ckpt cut to half (a copy cut short, a full disk)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run.dir, run)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    return run, last


def test_automatic_resume_passes_over_a_damaged_last_checkpoint_to_the_newest_readable_one(trained_run, tmp_path):
    run, last = _copy_with_damaged_last(trained_run, tmp_path)
    (best,) = [p for p in (run / "checkpoints").iterdir() if p.name != "last.ckpt"]
    os.utime(best, (1_000_000_000, 1_000_000_000))  # older than the damaged last.ckpt, which would be picked first
    before = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    proc = run_cli_in_process([*trained_run.args, "test=false"], run, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    said = [line for line in _lines(proc) if "cannot be read" in line]
    assert len(said) == 1 and str(last) in said[0] and f"resuming from {best}" in said[0], _lines(proc)[-20:]
    # it resumed after the best checkpoint's epoch (the run's only one): nothing trained, nothing rewritten
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before
    assert json.loads((run / "results.json").read_text())["epochs"] == 1


def test_automatic_resume_with_no_readable_checkpoint_is_one_line_naming_the_file(trained_run, tmp_path):
    run, last = _copy_with_damaged_last(trained_run, tmp_path)
    for other in (run / "checkpoints").iterdir():
        if other != last:
            other.unlink()
    damaged = last.read_bytes()
    proc = run_cli_in_process([*trained_run.args, "test=false"], run, tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: {last} (the newest checkpoint of run directory {run}, resumed from "
                           "automatically) cannot be read"), line
    assert last.read_bytes() == damaged


def test_an_explicit_damaged_ckpt_path_is_one_line_naming_it(trained_run, tmp_path):
    run, last = _copy_with_damaged_last(trained_run, tmp_path)
    proc = run_cli_in_process([*trained_run.args, "test=false", f"ckpt_path={last}"], tmp_path / "new",
                              tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: ckpt_path={last} cannot be read as a checkpoint"), line


def test_init_from_a_transformers_directory_without_weights_names_the_option(trained_run, tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "deit", "hidden_act": "gelu"}))
    proc = run_cli_in_process([*trained_run.args, "test=false", f"model.init_from={folder}"], tmp_path / "new",
                              tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(f"error: model.init_from={folder} "), line
    assert "model.safetensors" in line and "pytorch_model.bin" in line, line
