"""data.train_fraction: a seeded, class-balanced training subset, and a bootstrapped teacher keyed by it."""
import json
from collections import Counter

import numpy as np
import pytest
import yaml

from deit_train.data import DigitsDataModule
from deit_train.data.subset import balanced_subset, subset_tag
from deit_train.errors import ConfigError

from conftest import compose_config, run_cli_in_process

LABELS = np.array([0] * 40 + [1] * 20 + [2] * 10)


def test_subset_keeps_the_fraction_of_every_class_and_depends_only_on_the_seed():
    kept = balanced_subset(LABELS, 0.25, seed=0)
    assert Counter(LABELS[kept].tolist()) == {0: 10, 1: 5, 2: 2}  # round(2.5) = 2 (to even)
    assert np.array_equal(kept, np.unique(kept))  # sorted, no repeats
    assert np.array_equal(kept, balanced_subset(LABELS, 0.25, seed=0))
    assert not np.array_equal(kept, balanced_subset(LABELS, 0.25, seed=1))
    assert Counter(LABELS[balanced_subset(LABELS, 0.01, seed=0)].tolist()) == {0: 1, 1: 1, 2: 1}  # >= 1 per class
    assert np.array_equal(balanced_subset(LABELS, 1.0, seed=5), np.arange(70))


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5])
def test_bad_fraction_is_one_line(fraction):
    with pytest.raises(ConfigError, match="data.train_fraction"):
        DigitsDataModule(train_fraction=fraction)


def test_digits_train_split_shrinks_and_val_test_stay_whole():
    full, tenth = DigitsDataModule(image_size=8), DigitsDataModule(image_size=8, train_fraction=0.1)
    full.setup(), tenth.setup()
    assert len(full.train_set) == 1257 and len(tenth.train_set) == 126  # 10 classes, ~126 images each in train
    assert Counter(tenth.train_set.labels.tolist()) == Counter({c: round(n / 10) for c, n in
                                                                Counter(full.train_set.labels.tolist()).items()})
    assert len(tenth.val_set) == len(full.val_set) and len(tenth.test_set) == len(full.test_set)
    assert subset_tag(1.0, 0) == "" and subset_tag(0.1, 0) == "_train0.1_seed0"


def test_bootstrapped_teacher_learns_from_the_subset_and_is_cached_under_its_key(tmp_path):
    """... on its recipe's schedule: the student's trainer.max_epochs / limit_* do not shorten the cached teacher."""
    cfg = compose_config(["experiment=quickstart", "data.train_fraction=0.2"], tmp_path / "cfg")
    assert cfg.teacher.checkpoint.endswith("teachers/regnetx_002_digits_train0.2_seed0.pth")
    limits = ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    tiny = ["teacher.min_val_top1=0", "trainer.max_epochs=1", *limits, "model.hidden_size=48", "model.num_hidden_layers=1",
            f"teacher_recipe_overrides=[{','.join(map(repr, limits))}]"]  # the teacher's 12 epochs, one batch each
    proc = run_cli_in_process(["experiment=quickstart", "data.train_fraction=0.2", *tiny], tmp_path / "run",
                              tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the teacher trains on its recipe's schedule, not on trainer.max_epochs=1 trainer.limit_train_batches=1 " \
           "trainer.limit_val_batches=1 trainer.limit_test_batches=1" in proc.stdout + proc.stderr
    trainers = {run: yaml.safe_load((tmp_path / run / "csv" / "hparams.yaml").read_text())["trainer"]
                for run in ("run", "run/teacher")}
    assert trainers["run"]["max_epochs"] == 1
    assert trainers["run/teacher"]["max_epochs"] == 12 == compose_config(["experiment=quickstart_teacher"],
                                                                         tmp_path / "cfg2").trainer.max_epochs
    assert trainers["run/teacher"]["limit_train_batches"] == 1  # teacher_recipe_overrides reach it
    metrics = (tmp_path / "run" / "teacher" / "csv" / "metrics.csv").read_text().splitlines()
    assert sum(1 for line in metrics[1:] if line.split(",")[metrics[0].split(",").index("val/top1")]) == 12
    assert (tmp_path / "cache" / "teachers" / "regnetx_002_digits_train0.2_seed0.pth").is_file()
    assert not (tmp_path / "cache" / "teachers" / "regnetx_002_digits.pth").exists()
    for run in (tmp_path / "run" / "teacher", tmp_path / "run"):
        hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
        assert hparams["data"]["train_fraction"] == 0.2
    assert json.loads((tmp_path / "run" / "teacher" / "results.json").read_text())["test/top1"] >= 0
