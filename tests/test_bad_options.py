"""Every bad option is one line naming it: paths, numbers given as text, counts below their minimum."""
import os

import pytest
import torch

from conftest import FAST_DIGITS, compose_config, run_cli_in_process
from deit_train.run.cli import parse_args
from deit_train.errors import ConfigError
from deit_train.run.preflight import check_counts, check_paths, load_checkpoint_file
from deit_train.run.resume import check_checkpoint_fits


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, digits_teacher_file):
    tmp = tmp_path_factory.mktemp("bad")
    good = digits_teacher_file.read_bytes()
    (tmp / "truncated.pth").write_bytes(good[: len(good) // 2])
    (tmp / "notes.pth").write_text("not weights\n")
    (tmp / "unreadable.pth").write_bytes(good)
    os.chmod(tmp / "unreadable.pth", 0)
    (tmp / "folder.pth").mkdir()
    return tmp


def _cfg(tmp_path, *overrides, teacher=None):
    teacher = [f"teacher.checkpoint={teacher}", "teacher.min_val_top1=0"] if teacher else []
    return compose_config(["experiment=quickstart", *FAST_DIGITS, *teacher, *overrides], tmp_path / "run")


@pytest.mark.parametrize("option", ["teacher.checkpoint", "model.init_from"])
@pytest.mark.parametrize("name,problem", [
    ("missing.pth", "does not exist: check the path"),
    ("folder.pth", "is not a readable file"),
    ("unreadable.pth", "is not a readable file"),
    ("truncated.pth", "cannot be read as a checkpoint"),
    ("notes.pth", "cannot be read as a checkpoint"),
])
def test_a_weights_path_that_is_not_usable_is_named(bad_files, digits_teacher_file, tmp_path, option, name, problem):
    if name == "unreadable.pth" and os.access(bad_files / name, os.R_OK):
        pytest.skip("running as root: permissions do not stop reading")
    with pytest.raises(ConfigError, match=rf"^{option}={bad_files / name} {problem}"):
        check_paths(_cfg(tmp_path, f"{option}={bad_files / name}", teacher=digits_teacher_file))


def test_a_resume_path_that_is_not_a_training_checkpoint_is_named(bad_files, digits_teacher_file, tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(ConfigError, match=rf"^ckpt_path={bad_files / 'truncated.pth'} cannot be read as a checkpoint"):
        check_checkpoint_fits(bad_files / "truncated.pth", cfg)
    with pytest.raises(ConfigError, match=rf"^ckpt_path={digits_teacher_file} is not a Lightning training checkpoint: "
                                          rf"to start from its weights use model.init_from="):
        check_checkpoint_fits(digits_teacher_file, cfg)


def test_a_data_root_that_is_not_a_folder_is_named(bad_files, digits_teacher_file, tmp_path):
    with pytest.raises(ConfigError, match=rf"^data.root={bad_files / 'notes.pth'} is not a folder"):
        check_paths(_cfg(tmp_path, "data=imagefolder", f"data.root={bad_files / 'notes.pth'}",
                         teacher=digits_teacher_file))


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", "data.batch_size=0 must be at least 1"),
    ("data.batch_size=-8", "data.batch_size=-8 must be at least 1"),
    ("trainer.max_epochs=0", "trainer.max_epochs=0 must be at least 1"),
    ("data.num_workers=-1", "data.num_workers=-1 must be at least 0"),
    ("data.batch_size=many", "data.batch_size='many' is not a whole number"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs=2.5 is not a whole number"),
])
def test_counts_below_their_minimum_or_not_whole_are_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        check_counts(_cfg(tmp_path, override))


def test_tool_options_given_text_for_a_number_are_named():
    with pytest.raises(ConfigError, match=r"^top_k='five' is not a number \(default 5\): pass a number"):
        parse_args({"ckpt": None, "top_k": 5}, ["top_k=five"], "usage")
    assert parse_args({"ckpt": None, "top_k": 5}, ["top_k=3"], "usage").top_k == 3


@pytest.mark.parametrize("args,line", [
    (["optim.base_lr=fast"], "error: optim.base_lr='fast' is not a number (the config's default is 0.016): pass a number"),
])
def test_the_cli_prints_one_line_and_exits_2(tmp_path, digits_teacher_file, args, line):
    proc = run_cli_in_process(["experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}",
                               "teacher.min_val_top1=0", *args], tmp_path / "run", tmp_path / "cache")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [x for x in proc.stderr.splitlines() if x.strip()][-1] == line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_legacy_format_weights_file_is_still_accepted(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)  # pre-1.6 files
    assert torch.equal(load_checkpoint_file("teacher.checkpoint", tmp_path / "old.pth")["w"], torch.ones(2))
