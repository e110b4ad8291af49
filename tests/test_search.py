"""Hyperparameter search (`-m hparams_search=<name>`): Optuna studies driven by deit_train's Hydra sweeper, run
in-process on the digits with 2-epoch trials. The Slurm search is in test_slurm.py (its cluster is started there)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from conftest import FAST_DIGITS, ROOT, count_teacher_calls, main_in_process
from deit_train.compare.runs import find_runs

EPOCHS, STEPS = 2, 4  # FAST_DIGITS: trainer.limit_train_batches=4
SPACE_FILE = ROOT / "configs" / "hparams_search" / "quickstart_distill.yaml"


def search_args(sweep_dir: Path, teacher: Path, *extra: str) -> list[str]:
    return ["-m", "hparams_search=quickstart_distill", "experiment=quickstart", f"teacher.checkpoint={teacher}",
            "teacher.min_val_top1=0", f"trainer.max_epochs={EPOCHS}", *FAST_DIGITS, "optim.warmup_epochs=0",
            "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep_dir}", "hydra.sweeper.n_trials=4", *extra]


def run_search(sweep_dir: Path, teacher: Path, *extra: str):
    return main_in_process(search_args(sweep_dir, teacher, *extra), {"DEIT_TRAIN_CACHE": str(sweep_dir.parent / "cache")})


def load(sweep_dir: Path) -> optuna.Study:
    return optuna.load_study(study_name="quickstart_distill", storage=f"sqlite:///{sweep_dir}/optuna.db")


def declared_ranges() -> dict[str, tuple[float, float]]:
    """The ranges of the shipped space, read from its file."""
    params = yaml.safe_load(SPACE_FILE.read_text())["hydra"]["sweeper"]["params"]
    ranges = {}
    for key, text in params.items():
        low, high = re.search(r"interval\(([^,]+),([^)]+)\)", text).groups()
        ranges[key] = (float(low), float(high))
    return ranges


@dataclass
class Search:
    dir: Path
    process: object
    study: optuna.Study
    teacher_calls: list[int]  # training-time teacher forwards of each trial, in order


@pytest.fixture(scope="module")
def search(tmp_path_factory, digits_teacher_file) -> Search:
    """A 4-trial search without pruning, seed 0, each trial's teacher forwards counted."""
    sweep_dir = tmp_path_factory.mktemp("search") / "sweep"
    with pytest.MonkeyPatch.context() as monkeypatch:
        calls, per_trial = count_teacher_calls(monkeypatch), []
        import deit_train.train as train_module

        original = train_module.train

        def counted(cfg):
            before = calls()
            try:
                return original(cfg)
            finally:
                per_trial.append(calls() - before)

        monkeypatch.setattr(train_module, "train", counted)
        proc = run_search(sweep_dir, digits_teacher_file, "hydra.sweeper.pruner=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Search(sweep_dir, proc, load(sweep_dir), per_trial)


def test_trials_sample_the_space_and_report_each_runs_recorded_metric(search):
    trials = search.study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    ranges = declared_ranges()
    for trial in trials:
        assert set(trial.params) == set(ranges)
        for key, value in trial.params.items():
            assert ranges[key][0] <= value <= ranges[key][1], (key, value)
        run_dir = search.dir / str(trial.number)
        assert trial.user_attrs["run_dir"] == str(run_dir)
        results = json.loads((run_dir / "results.json").read_text())
        assert trial.value == results["best/val/top1"]  # the objective is what the run recorded
        assert results["search/trial"] == trial.number
        # the run trained with the trial's parameters (soft distillation, from the search config)
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        assert config["distill"]["distill_type"] == "soft"
        assert config["distill"]["alpha"] == trial.params["distill.alpha"]
        assert config["optim"]["base_lr"] == trial.params["optim.base_lr"]
        # every validated epoch reported to the study (what the pruner judges)
        with open(run_dir / "csv" / "metrics.csv") as handle:
            rows = [r for r in csv_rows(handle) if r.get("val/top1")]
        assert trial.intermediate_values == {int(r["epoch"]): float(r["val/top1"]) for r in rows}
    assert len({tuple(t.params.values()) for t in trials}) == 4
    assert search.study.user_attrs["sampler_seed"] == 0


def csv_rows(handle):
    import csv

    return list(csv.DictReader(handle))


def test_trials_after_the_first_read_the_teacher_cache(search):
    # the first trial runs the teacher on every training step and writes the cache; the others read it (the one
    # teacher forward each is the cache's drift guard on its first read step)
    assert search.teacher_calls == [EPOCHS * STEPS, 1, 1, 1]
    entries = [p for p in (search.dir / "teacher_logits").iterdir() if p.is_dir()]
    assert len(entries) == 1 and len(list(entries[0].glob("epoch*.json"))) == EPOCHS


def test_summary_plots_best_overrides_and_compare_read_the_search(search, capsys):
    best = max(search.study.get_trials(), key=lambda t: t.value)
    out = search.process.stdout
    assert "best trial" in out and f"study quickstart_distill: 4 trials" in out and out.count("complete") >= 4
    for name in ("optimization_history.png", "param_importances.png"):
        assert (search.dir / name).stat().st_size > 10_000
    line = (search.dir / "best_overrides.txt").read_text().split()
    assert "experiment=quickstart" in line and "distill=soft" in line
    assert not any(o.startswith(("hparams_search=", "hydra.")) for o in line)
    for key, value in best.params.items():
        assert f"{key}={value!r}" in line
    # the best-trial table shows each parameter and the run directory whole (a log file is 80 columns to Rich)
    best_table = "".join(row for row in out[out.index("best trial"):].splitlines(True) if row.startswith("│"))
    assert all(f"{key}={value!r}" in best_table for key, value in best.params.items())
    assert str(search.dir / str(best.number)) in best_table
    # the report on request, from the storage alone
    from deit_train.search.report import main as report

    report_dir = search.dir.parent / "report"
    report([f"storage=sqlite:///{search.dir}/optuna.db", f"out={report_dir}"])
    assert "best trial" in capsys.readouterr().out
    assert (report_dir / "best_overrides.txt").read_text() == (search.dir / "best_overrides.txt").read_text()
    # compare_runs reads a search's run directories as a multirun's: one run per trial, named by its parameters
    runs = find_runs([search.dir])
    assert len(runs) == 4
    assert all(f"distill.alpha={t.params['distill.alpha']!r}" in r.name for t, r in zip(search.study.get_trials(), runs))


def test_killed_search_continues_to_n_trials_and_same_seed_same_parameters(search, tmp_path, digits_teacher_file,
                                                                          monkeypatch):
    import deit_train.train as train_module

    original, started = train_module.train, []

    def killed_at_the_third_trial(cfg):
        started.append(cfg.optuna_trial)
        if len(started) == 3:
            raise KeyboardInterrupt
        return original(cfg)

    sweep_dir = tmp_path / "sweep"
    monkeypatch.setattr(train_module, "train", killed_at_the_third_trial)
    killed = run_search(sweep_dir, digits_teacher_file, "hydra.sweeper.pruner=null")
    assert killed.returncode != 0
    assert [t.state for t in load(sweep_dir).get_trials()] == [TrialState.COMPLETE] * 2 + [TrialState.RUNNING]

    monkeypatch.setattr(train_module, "train", original)
    again = run_search(sweep_dir, digits_teacher_file, "hydra.sweeper.pruner=null")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 finished (2 complete, 0 pruned, 0 fail)" in again.stdout + again.stderr
    trials = load(sweep_dir).get_trials()
    assert [(t.number, t.state) for t in trials] == [(n, TrialState.COMPLETE) for n in range(4)]  # 4, not 6
    assert trials[2].user_attrs["run_dir"] == str(sweep_dir / "2")  # the killed trial ran again in its directory
    # the same seed proposes the same parameters in the same order, restarted or not
    assert [t.params for t in trials] == [t.params for t in search.study.get_trials()]


def test_pruned_trial_keeps_its_run_directory_and_is_marked_pruned(tmp_path, digits_teacher_file):
    sweep_dir = tmp_path / "sweep"
    # a pruner configured to prune: top-1 never reaches 1.5, so the trial is pruned at its first epoch
    proc = run_search(sweep_dir, digits_teacher_file, "hydra.sweeper.n_trials=1", "trainer.max_epochs=3",
                      "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner", "+hydra.sweeper.pruner.lower=1.5",
                      "hydra.sweeper.pruner.n_warmup_steps=0", "~hydra.sweeper.pruner.n_startup_trials")
    assert proc.returncode == 0, proc.stderr[-3000:]
    [trial] = load(sweep_dir).get_trials()
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [0]
    run_dir = sweep_dir / "0"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["search/pruned_at_epoch"] == 0 and results["epochs"] == 1  # stopped after epoch 0 of 3
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert re.search(r"│ 0\s+│ pruned", proc.stdout)


@pytest.mark.parametrize(("args", "message"), [
    (["model.no_such_option=interval(0.0,1.0)"], "hydra.sweeper.params: model.no_such_option is not an option"),
    (["distill.tau=interval(5.0,1.0)"], "distill.tau=interval(5.0, 1.0) is empty or inverted"),
    (["distill.tau=interval(2.0,2.0)"], "distill.tau=interval(2.0, 2.0) is empty or inverted"),
    (["optimized_metric=best/val/top3"], "optimized_metric=best/val/top3 is not a metric this run records"),
    # best/* is recorded with the test of the best checkpoint: test=false would train every trial, then fail it
    (["test=false"], "optimized_metric=best/val/top1 is not a metric this run records"),
    (["hydra.sweeper.storage=sqlite:///{tmp}/a_file/optuna.db"], "hydra.sweeper.storage=sqlite:///"),
])
def test_bad_search_input_is_one_line_before_any_trial(tmp_path, digits_teacher_file, args, message):
    (tmp_path / "a_file").write_text("not a folder")
    sweep_dir = tmp_path / "sweep"
    proc = run_search(sweep_dir, digits_teacher_file, *(a.format(tmp=tmp_path) for a in args))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and message in proc.stderr
    assert not any(p.name.isdigit() for p in sweep_dir.glob("*"))  # no trial started


def test_search_without_multirun_is_one_line(tmp_path, digits_teacher_file):
    args = [a for a in search_args(tmp_path / "sweep", digits_teacher_file) if a != "-m"]
    proc = main_in_process([*args, f"hydra.run.dir={tmp_path / 'run'}"], {"DEIT_TRAIN_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2
    assert proc.stderr == ("error: hparams_search=quickstart_distill runs a search: add -m (python -m deit_train -m "
                           "hparams_search=quickstart_distill experiment=...)\n")
    assert not (tmp_path / "run" / "csv").exists()


def test_continuing_a_study_with_another_space_is_refused(tmp_path):
    from deit_train.errors import ConfigError
    from deit_train.search.study import open_storage, open_study

    storage = open_storage(f"sqlite:///{tmp_path}/optuna.db")
    identity = {"space": {"distill.alpha": "a"}, "objective": "best/val/top1", "overrides": []}
    first = open_study(storage, "s", "maximize", identity, seed=3)
    assert open_study(storage, "s", "maximize", identity, seed=None).user_attrs["sampler_seed"] == 3
    with pytest.raises(ConfigError, match=r"is another search \(differing in space\): pass another hydra.sweeper.study_name"):
        open_study(storage, "s", "maximize", {**identity, "space": {"distill.tau": "b"}}, seed=3)
    assert first.study_name == "s"



def test_another_space_in_the_same_storage_is_refused_before_any_trial(tmp_path, digits_teacher_file):
    from deit_train.search.study import open_storage, open_study

    storage = f"sqlite:///{tmp_path}/shared.db"
    other = {"space": {"distill.alpha": "another range"}, "objective": "best/val/top1", "overrides": []}
    open_study(open_storage(storage), "quickstart_distill", "maximize", other, seed=0)
    sweep_dir = tmp_path / "sweep"
    proc = run_search(sweep_dir, digits_teacher_file, f"hydra.sweeper.storage={storage}")
    assert proc.returncode == 2
    assert proc.stderr == ("error: hydra.sweeper.study_name=quickstart_distill in this storage is another search (differing "
                           "in overrides and space): pass another hydra.sweeper.study_name (or storage) to start "
                           "a new study, or the same search to continue it\n")
    assert not sweep_dir.exists()
    assert optuna.load_study(study_name="quickstart_distill", storage=storage).get_trials() == []
