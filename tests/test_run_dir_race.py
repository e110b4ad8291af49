"""A multi-task start (srun, submitit with several tasks per node) shares one run directory: global rank 0 alone
judges and writes its record (.hydra/), and writes it atomically, so no rank stops on a half-written file."""
import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from conftest import compose_config
from deit_train.errors import ConfigError
from deit_train.run.config import CONFIG_DIR
from deit_train.run.launch import RANK_VARIABLES, is_global_zero
from deit_train.run.resume import KeepStoredRunConfig, check_same_experiment, stored_config_path


@pytest.fixture
def rank(monkeypatch):
    """Sets this process's rank variables as a launcher would (``rank(1, "SLURM_PROCID")``)."""
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_rank(value: int, variable: str = "SLURM_PROCID") -> None:
        monkeypatch.setenv(variable, str(value))
    return set_rank


def _half_written(cfg, run_dir: Path) -> Path:
    """``run_dir``'s config.yaml as a reader sees it while rank 0 is half-way through writing it."""
    text = OmegaConf.to_yaml(cfg)
    path = stored_config_path(run_dir)
    path.parent.mkdir(parents=True)
    path.write_text(text[: len(text) // 2].rsplit("\n", 1)[0] + "\n")
    return path


def _job_config(run_dir: Path, *overrides: str):
    """The config Hydra hands to its job callbacks (with the ``hydra`` node) for a run in ``run_dir``."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.overrides.task = ["experiment=quickstart", *overrides]
    return cfg


def test_global_rank_zero_from_every_launcher(rank):
    assert is_global_zero({}) and is_global_zero({"SLURM_PROCID": "0", "RANK": "0"})
    for variable in RANK_VARIABLES:
        assert not is_global_zero({variable: "1"}), variable
    assert not is_global_zero({"LOCAL_RANK": "0", "NODE_RANK": "1"})  # local rank 0 of the second node


@pytest.mark.parametrize("variable", ["SLURM_PROCID", "RANK", "LOCAL_RANK"])
def test_rank_above_zero_does_not_judge_a_half_written_record(rank, tmp_path, variable):
    cfg = compose_config(["experiment=quickstart"], tmp_path)
    _half_written(cfg, tmp_path)
    rank(1, variable)
    check_same_experiment(cfg, tmp_path)  # rank 0 decides; before, this rank stopped the job


def test_rank_zero_still_refuses_another_experiment(rank, tmp_path):
    cfg = compose_config(["experiment=quickstart"], tmp_path)
    _half_written(cfg, tmp_path)  # what a crash mid-write used to leave: a record of "another config"
    rank(0)
    with pytest.raises(ConfigError, match=f"^run directory {tmp_path} holds a run with another config"):
        check_same_experiment(cfg, tmp_path)


def test_rank_zero_writes_the_record_once_and_atomically(rank, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    cfg = _job_config(run_dir, "distill=soft")
    rank(1)
    KeepStoredRunConfig().on_job_start(config=cfg, task_function=None)
    assert not (run_dir / ".hydra").exists()  # ranks above 0 write nothing

    rank(0)

    def crash(fd):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:  # a full disk (or a kill) mid-write leaves no partial record
        patch.setattr(os, "fsync", crash)
        with pytest.raises(OSError):
            KeepStoredRunConfig().on_job_start(config=cfg, task_function=None)
    assert not stored_config_path(run_dir).exists() and not [p for p in (run_dir / ".hydra").iterdir()
                                                               if p.name.startswith(".")]

    KeepStoredRunConfig().on_job_start(config=cfg, task_function=None)
    record = run_dir / ".hydra"
    stored = OmegaConf.load(record / "config.yaml")
    assert "hydra" not in stored and stored.distill.distill_type == "soft"
    assert OmegaConf.to_container(stored) == OmegaConf.to_container(OmegaConf.masked_copy(
        cfg, [k for k in cfg if k != "hydra"]))
    assert OmegaConf.load(record / "overrides.yaml") == ["experiment=quickstart", "distill=soft"]
    assert OmegaConf.load(record / "hydra.yaml").hydra.runtime.output_dir == str(run_dir)
    check_same_experiment(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), run_dir)

    written = (record / "config.yaml").read_bytes()
    KeepStoredRunConfig().on_job_start(config=_job_config(run_dir, "distill=hard"), task_function=None)
    assert (record / "config.yaml").read_bytes() == written  # the run's record is never rewritten
