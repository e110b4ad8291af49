"""Seed-aware comparison: grouping, mean/std/95 % CI and Welch's test against hand-computed values, and a tiny
2-seed x 2-variant sweep compared end to end."""
import math
import os
import re
import subprocess
import sys

import pytest
from scipy import stats as scipy_stats

from deit_train.compare.cli import main
from deit_train.compare.runs import Run, find_runs
from deit_train.compare.statistics import describe, find_baselines, group_runs, group_statistics, welch_p
from deit_train.errors import ConfigError

from conftest import FAST_DIGITS, ROOT


def _run(name, distill, seed, test_top1, overrides=True):
    config = {"seed": seed, "distill": {"distill_type": distill}, "model": {"hidden_size": 96}, "paths": {"x": name}}
    return Run(name=name, source=name, config=config, summary={"test/top1": test_top1},
               overrides=[f"distill={distill}", f"seed={seed}"] if overrides else [])


def test_mean_std_and_t_interval_by_hand():
    s = describe([0.90, 0.92, 0.94])
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.92), pytest.approx(0.02))
    half = 4.302652729911275 * 0.02 / math.sqrt(3)  # t_{0.975, 2} from tables
    assert s.ci == pytest.approx((0.92 - half, 0.92 + half))
    single = describe([0.5])
    assert (single.n, single.mean, single.std, single.ci) == (1, 0.5, None, None)


def test_welch_p_value_by_hand():
    a, b = [0.90, 0.92, 0.94], [0.95, 0.96, 0.98, 0.97]
    va, vb = 0.02**2, (sum((x - 0.965) ** 2 for x in b) / 3)
    se2 = va / 3 + vb / 4
    t = (0.92 - 0.965) / math.sqrt(se2)
    df = se2**2 / ((va / 3) ** 2 / 2 + (vb / 4) ** 2 / 3)  # Welch-Satterthwaite
    assert welch_p(a, b) == pytest.approx(2 * scipy_stats.t.sf(abs(t), df), rel=1e-9)
    assert welch_p([0.9], b) is None and welch_p([0.9, 0.9], [0.9, 0.9]) is None


def test_runs_differing_only_in_seed_form_groups_named_by_their_overrides():
    runs = [_run(f"r{i}", d, s, 0.9 + i / 100) for i, (d, s) in
            enumerate([("none", 0), ("hard", 0), ("none", 1), ("hard", 1), ("none", 2)])]
    groups = group_runs(runs)
    assert [(g.name, [r.name for r in g.runs]) for g in groups] == [
        ("distill=none", ["r0", "r2", "r4"]), ("distill=hard", ["r1", "r3"])]
    baselines = find_baselines(groups, "distill=none")
    assert {name: b.name for name, b in baselines.items()} == {"distill=hard": "distill=none"}
    table = group_statistics(groups, baselines)
    assert table["distill=none"]["test top-1"].mean == pytest.approx((0.90 + 0.92 + 0.94) / 3)
    assert table["distill=none"]["test top-1"].p_vs_baseline is None  # the baseline itself
    assert table["distill=hard"]["test top-1"].p_vs_baseline == pytest.approx(
        scipy_stats.ttest_ind([0.91, 0.93], [0.90, 0.92, 0.94], equal_var=False).pvalue)
    # without overrides (e.g. W&B API runs) the differing config keys name the groups; the baseline is found in the
    # config too
    bare = group_runs([_run(r.name, *r.overrides[0][8:].split(), r.config["seed"], 0.9, overrides=False)
                       for r in runs[:4]])
    assert [g.name for g in bare] == ["distill.distill_type=none", "distill.distill_type=hard"]
    assert find_baselines(bare, "distill.distill_type=hard") == {"distill.distill_type=none": bare[1]}


def _efficiency_run(distill, fraction, seed):
    run = _run(f"{distill}{fraction}{seed}", distill, seed, 0.9)
    run.config["data"] = {"train_fraction": fraction}
    run.overrides.append(f"data.train_fraction={fraction}")
    return run


def test_each_group_is_tested_against_the_baseline_sharing_its_other_settings():
    runs = [_efficiency_run(d, f, s) for d in ("none", "hard") for f in (0.1, 1.0) for s in (0, 1)]
    groups = group_runs(runs)
    assert sorted(g.name for g in groups) == ["distill=hard data.train_fraction=0.1",
                                              "distill=hard data.train_fraction=1.0",
                                              "distill=none data.train_fraction=0.1",
                                              "distill=none data.train_fraction=1.0"]
    assert {k: v.name for k, v in find_baselines(groups, "distill=none").items()} == {
        "distill=hard data.train_fraction=0.1": "distill=none data.train_fraction=0.1",
        "distill=hard data.train_fraction=1.0": "distill=none data.train_fraction=1.0"}
    # a hard run with no fraction override is as close to none@0.1 as to none@1.0
    mixed = group_runs([*runs[:4], _run("h", "hard", 0, 0.9)])
    with pytest.raises(ConfigError, match="fit distill=hard equally"):
        find_baselines(mixed, "distill=none")


def test_group_by_keeps_a_sweeps_bootstrapped_teacher_out_of_the_students_groups():
    runs = [_efficiency_run(d, 0.1, s) for d in ("none", "hard") for s in (0, 1, 2)]
    teacher = _efficiency_run("none", 0.1, 0)  # found at <job 0>/teacher: another experiment, same fraction
    for run in runs:
        run.config["task_name"] = "quickstart"
    teacher.config["task_name"] = "quickstart_teacher"
    groups = group_runs([*runs, teacher], ["data.train_fraction", "distill.distill_type"])
    assert [(g.name, len(g.runs)) for g in groups] == [
        ("data.train_fraction=0.1 distill.distill_type=none task_name=quickstart", 3),
        ("data.train_fraction=0.1 distill.distill_type=hard task_name=quickstart", 3),
        ("data.train_fraction=0.1 distill.distill_type=none task_name=quickstart_teacher", 1)]
    assert find_baselines(groups, "distill.distill_type=none") == {groups[1].name: groups[0]}
    assert [g.name for g in group_runs(runs, ["distill.distill_type"])] == [  # one experiment: no task_name
        "distill.distill_type=none", "distill.distill_type=hard"]


def test_group_by_and_baseline_errors():
    runs = [_run("a", "none", 0, 0.9), _run("b", "hard", 0, 0.9), _run("c", "hard", 1, 0.9)]
    by_seed = group_runs(runs, ["seed"])
    assert [(g.name, len(g.runs)) for g in by_seed] == [("seed=0", 2), ("seed=1", 1)]
    with pytest.raises(ConfigError, match="no group of runs has it"):
        find_baselines(group_runs(runs), "distill=soft")
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        find_baselines(by_seed, "distill")


def test_tiny_sweep_compared_end_to_end(tmp_path, digits_teacher_file, capsys):
    sweep = tmp_path / "sweep"
    env = {**os.environ, "DEIT_TRAIN_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "deit_train", "-m", "experiment=quickstart", "distill=none,hard", "seed=0,1",
         f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "trainer.max_epochs=1", *FAST_DIGITS,
         "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = find_runs([sweep])
    assert sorted(r.name for r in runs) == ["distill=hard seed=0", "distill=hard seed=1",
                                            "distill=none seed=0", "distill=none seed=1"]
    png = tmp_path / "cmp.png"
    assert main([str(sweep), "--baseline", "distill=none", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    groups = group_runs(runs)
    assert sorted(g.name for g in groups) == ["distill=hard", "distill=none"]
    hard = next(g for g in groups if g.name == "distill=hard")
    values = hard.values("test top-1")
    assert len(values) == 2 and f"{sum(values) / 2:.4f} ± {describe(values).std:.4f}" in out
    assert "Welch t-test p against the baseline group" in out
    assert re.search(r"distill=hard\s*│\s*test top-1\s*│\s*2\s*│.*│\s*distill=none\s*│", out), out
    assert "test/disagree" not in out and "teacher" in out  # the disagreement table names classifiers
    for path in (png, tmp_path / "cmp_groups.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert main([str(sweep), "--baseline", "distill=soft", "--out", str(png)]) == 2
