"""Every check that can fail without training runs first (deit_train.run.preflight): a bad student option stops
in seconds with one line, before the teacher is bootstrapped, and nothing is written."""
from __future__ import annotations

import time

import pytest

from conftest import compose_config, run_cli_in_process
from deit_train.errors import ConfigError
from deit_train.run.preflight import preflight


def test_bad_student_option_stops_before_the_teacher_is_bootstrapped(tmp_path):
    cache, run = tmp_path / "cache", tmp_path / "run"
    started = time.perf_counter()
    proc = run_cli_in_process(["experiment=quickstart", "model.image_size=33"], run, cache)
    seconds = time.perf_counter() - started
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: model.image_size=33 is not divisible by model.patch_size=4: pick an image size that is a multiple "
        "of the patch size (e.g. 32)")
    assert "training it first" not in proc.stderr  # the teacher bootstrap never started
    assert not (cache / "teachers").exists() and not (run / "teacher").exists()
    assert not (run / "checkpoints").exists() and not (run / "csv").exists()
    assert seconds < 120  # a teacher bootstrap alone takes minutes on this CPU


@pytest.mark.parametrize("override, line", [
    ("augment.re_prob=1.5", "augment.re_prob=1.5 is outside [0, 1]: pass a probability in [0, 1]"),
    ("distill.alpha=-0.1", "distill.alpha=-0.1 is outside [0, 1]: pass a probability in [0, 1]"),
    ("model.drop_path_rate=1.0", "model.drop_path_rate=1.0 is outside [0, 1): pass a rate in [0, 1)"),
    ("optim.layer_decay=0", "optim.layer_decay=0 is outside (0, 1]: pass a fraction in (0, 1]"),
    ("optim.base_lr=0", "optim.base_lr=0 is outside (0, inf): pass a number > 0"),
    ("augment.repeated_aug=0", "augment.repeated_aug=0 must be at least 1: pass an integer >= 1"),
    ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0 must be at least 1: pass an integer >= 1"),
    ("model.hidden_size=50", "model.hidden_size=50 is not divisible by model.num_attention_heads=3"),
])
def test_out_of_range_options_are_one_line(tmp_path, digits_teacher_file, override, line):
    cfg = compose_config(["experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}", "augment=deit",
                          override], tmp_path)
    with pytest.raises(ConfigError) as error:
        preflight(cfg)
    assert str(error.value) == line
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written


def test_path_errors_name_the_option(tmp_path):
    cfg = compose_config(["experiment=quickstart", f"teacher.checkpoint={tmp_path / 'missing.pth'}",
                          "teacher_recipe=null"], tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"^teacher.checkpoint={tmp_path / 'missing.pth'} does not exist"):
        preflight(cfg)
    cfg = compose_config(["experiment=quickstart", "data=imagefolder", f"data.root={tmp_path / 'nowhere'}"],
                         tmp_path / "run")
    with pytest.raises(ConfigError, match=rf"^data.root={tmp_path / 'nowhere'} is not a folder"):
        preflight(cfg)


def test_a_good_config_passes_and_records_what_it_trains(tmp_path, digits_teacher_file):
    cfg = compose_config(["experiment=quickstart", f"teacher.checkpoint={digits_teacher_file}"], tmp_path)
    preflight(cfg)
    assert (tmp_path / ".hydra" / "trained.yaml").is_file()
    assert cfg.data.num_classes == 10
