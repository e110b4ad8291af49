"""Every shell command in README.md and docs/*.md, checked the way a user types it, from a fresh working directory.

Each command is listed in CHECKS with how it is checked; a command added to the README or the docs without an entry here
fails ``test_every_readme_command_is_checked``:

- ``run``: run as typed, with tiny overrides where it trains (``test_readme_quickstart_then_compare_export_predict``);
- ``compose``: needs a data set, weights or GPUs that tests do not have: its overrides, exactly as typed, must
  compose into a config (every option exists, every value has its type);
- ``options``: a tool command whose inputs tests do not have: its options must parse;
- ``elsewhere``: run by the named test;
- ``not run``: changes the environment (installs) or is this test suite itself.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from omegaconf import OmegaConf

from conftest import FAST_DIGITS, ROOT, compose_config
from deit_train import benchmark as benchmark_cli
from deit_train import export as export_cli
from deit_train import predict as predict_cli
from deit_train.pack import compose_pack_config
from deit_train.run.cli import parse_args, run_main
from deit_train.compare.cli import main as compare_runs
from deit_train.run.config import CONFIG_DIR
from deit_train.train import main as train_main

README = ROOT / "README.md"
# the README is the guide; the details live in docs/ (their commands are checked alike)
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
CHECKS: dict[str, tuple[str, str]] = {
    'pip install -e ".[dev]" && scripts/install_slurm.sh': ("not run", "installs packages"),
    "python3 -m venv .venv && . .venv/bin/activate": ("not run", "creates the environment the tests run in"),
    "scripts/install_slurm.sh": ("not run", "installs Debian packages"),
    "pip install -e .": ("not run", "installs the package"),
    'pip install -e ".[hf]"': ("not run", "installs transformers"),
    "pytest": ("not run", "this test suite"),
    "python -m deit_train experiment=quickstart": ("run", ""),
    # docs/experiments.md: the EMA and checkpoint-averaging measurement (a shell loop over the sweep's runs)
    "for run in multirun/ema_avg/[0-9]*/; do": ("not run", "the shell loop around the average and eval commands"),
    "done": ("not run", "the end of that loop"),
    "python -m deit_train -m experiment=quickstart module.ema_decay=0.99 callbacks.model_checkpoint.save_top_k=3 "
    "seed=0,1,2 hydra.sweep.dir=multirun/ema_avg": ("compose", ""),
    "python -m deit_train.average":
        ("elsewhere", "test_weights.py::test_average_of_the_top_k_is_the_parameter_wise_mean_and_eval_reads_it"),
    "python -m deit_train.average run=$run k=3 by=top":
        ("elsewhere", "test_weights.py::test_average_of_the_top_k_is_the_parameter_wise_mean_and_eval_reads_it"),
    "python -m deit_train.average run=$run k=3 by=top weights=ema":
        ("elsewhere", "test_weights.py::test_average_of_the_last_k_emas"),
    "python -m deit_train.average run=<run dir> k=3 [by=top|last] [weights=student|ema] [out=<file>]":
        ("elsewhere", "test_weights.py::test_average_bad_input_is_one_line_and_writes_nothing"),
    "python -m deit_train.eval ckpt=$run/checkpoints/last.ckpt":
        ("elsewhere", "test_weights.py::test_predict_and_eval_read_the_ema"),
    "python -m deit_train.eval ckpt=$run/checkpoints/last.ckpt weights=ema":
        ("elsewhere", "test_weights.py::test_predict_and_eval_read_the_ema"),
    "python -m deit_train experiment=quickstart ckpt_path=outputs/quickstart/<date_time>/checkpoints/last.ckpt":
        ("elsewhere", "test_resume_guards.py::test_resume_by_ckpt_path_continues_in_its_run_dir_on_the_extended_schedule"),
    "python scripts/compare_runs.py multirun/tab3_token --baseline distill=none --out tab3.png":
        ("elsewhere", "test_compare.py::test_tiny_sweep_compared_end_to_end"),
    "python -m deit_train": ("run", ""),
    "python scripts/compare_runs.py outputs/quickstart": ("run", ""),
    "python -m deit_train.export ckpt=<run>/checkpoints/last.ckpt format=hf out=hf_model": ("run", ""),
    "python -m deit_train.predict ckpt=... images=<folder or [a.png,b.png]> top_k=5 --attention [image_size=384]":
        ("run", ""),
    "python -m deit_train experiment=deit_small_distill data.root=/path/to/imagenet "
    "teacher.checkpoint=/path/regnety_160.pth": ("compose", "ImageNet and the official RegNetY-16GF"),
    "python -m deit_train experiment=deit_tiny data=hf data.path=/data/saved_dataset": ("compose", "a saved data set"),
    "python -m deit_train experiment=deit_tiny data=hf data.path=parquet data.data_files='{train: "
    "/d/train-*.parquet, validation: /d/val-*.parquet}' data.image_column=img data.label_column=fine_label":
        ("compose", "parquet files"),
    "python -m deit_train experiment=deit_tiny data=hf data.path=/data/saved_dataset data.streaming=true "
    "data.train_samples=1281167": ("compose", "a saved data set"),
    "python -m deit_train experiment=deit_tiny data=cifar10 data.root=/data/cifar": ("compose", "CIFAR-10 files"),
    "python -m deit_train experiment=deit_base_384_finetune data.root=/data/imagenet "
    "model.init_from=/ckpt/deit_base_224.ckpt": ("compose", "ImageNet and a DeiT-B checkpoint"),
    "python -m deit_train experiment=simmim_quickstart": ("compose", "three training stages: tests/test_simmim.py"),
    "python -m deit_train experiment=simmim_pretrain data.root=/path/imagenet": ("compose", "ImageNet"),
    "python -m deit_train experiment=simmim_finetune data.root=/path/imagenet "
    "model.init_from=<pretrain run>/checkpoints/last.ckpt": ("compose", "ImageNet and a pretraining run"),
    "python -m deit_train -m hydra/launcher=slurm distill=none,soft,hard model=deit_tiny,deit_small":
        ("compose", "a GPU Slurm cluster"),
    "sbatch slurm/train.sbatch experiment=deit_small_distill data.root=... teacher.checkpoint=...":
        ("elsewhere", "test_slurm.py::test_sbatch_requeue_resumes_in_same_run_dir"),
    "scripts/slurm_local_cluster.sh start /tmp/slurm && export SLURM_CONF=/tmp/slurm/slurm.conf":
        ("elsewhere", "test_slurm.py::slurm"),
    "scripts/slurm_local_cluster.sh stop /tmp/slurm": ("elsewhere", "test_slurm.py::slurm"),
    "scripts/slurm_local_cluster.sh": ("elsewhere", "test_slurm.py::slurm"),
    "python -m deit_train -m hydra/launcher=slurm_cpu experiment=quickstart distill=none,hard":
        ("elsewhere", "test_slurm.py::test_submitit_sweep_runs_each_job_in_its_own_dir"),
    "sbatch --gres=none --ntasks-per-node=1 --cpus-per-task=2 slurm/train.sbatch experiment=quickstart":
        ("elsewhere", "test_slurm.py::test_sbatch_requeue_resumes_in_same_run_dir"),
    "python scripts/compare_runs.py --wandb ENTITY/PROJECT --group quickstart": ("not run", "needs a W&B account"),
    "python -m deit_train.benchmark models=[deit_tiny,deit_small] batch_sizes=[64] precisions=[fp32,bf16,fp16] "
    "attention=[sdpa,eager]": ("options", "a GPU benchmark: tests/test_benchmark.py runs it small"),
    "python scripts/benchmark_step.py": ("elsewhere", "test_benchmark.py"),
    "python scripts/benchmark_teacher.py": ("not run", "a timed benchmark of full-size models"),
    "python scripts/benchmark_cache.py": ("not run", "a timed benchmark of full-size models"),
    "python scripts/benchmark_startup.py": ("not run", "a timed benchmark (a minute here)"),
    "python -m deit_train -m experiment=quickstart distill=none,soft,hard seed=0,1,2 hydra.sweep.dir=multirun/tab3_token":
        ("elsewhere", "test_compare.py::test_tiny_sweep_compared_end_to_end"),
    "python -m deit_train experiment=deit_small_distill data.root=... teacher=ensemble "
    "teacher@teacher.members.0=regnety_160 teacher.members.0.checkpoint=/path/regnety_160.pth "
    "teacher@teacher.members.1=regnety_160 teacher.members.1.checkpoint=/path/other.pth teacher.combine=probs":
        ("compose", "ImageNet and two teacher files"),
    'python -m deit_train -m experiment=quickstart distill=none,hard,kd seed=0,1,2 data.train_fraction=0.1 teacher.checkpoint=$HOME/.cache/deit_train/teachers/regnetx_002_digits.pth teacher.cache_dir=multirun/tcache data.batch_size=32 optim.base_lr=0.032 trainer.max_epochs=190 optim.warmup_epochs=13 trainer.check_val_every_n_epoch=10 hydra.sweep.dir=multirun/methods_0.1/logit':
        ("compose", "a measured sweep: its figures are in the table below it"),
    'python -m deit_train -m experiment=quickstart distill=dkd distill.warmup_epochs=16 seed=0,1,2 data.train_fraction=0.1 teacher.checkpoint=$HOME/.cache/deit_train/teachers/regnetx_002_digits.pth teacher.cache_dir=multirun/tcache data.batch_size=32 optim.base_lr=0.032 trainer.max_epochs=190 optim.warmup_epochs=13 trainer.check_val_every_n_epoch=10 hydra.sweep.dir=multirun/methods_0.1/dkd':
        ("compose", "a measured sweep: its figures are in the table below it"),
    'python -m deit_train -m experiment=quickstart distill=feature seed=0,1,2 data.train_fraction=0.1 teacher.checkpoint=$HOME/.cache/deit_train/teachers/regnetx_002_digits.pth data.batch_size=32 optim.base_lr=0.032 trainer.max_epochs=190 optim.warmup_epochs=13 trainer.check_val_every_n_epoch=10 hydra.sweep.dir=multirun/methods_0.1/feature':
        ("compose", "a measured sweep: its figures are in the table below it"),
    'python scripts/compare_runs.py multirun/methods_0.1/logit multirun/methods_0.1/dkd multirun/methods_0.1/feature --group-by distill.distill_type --baseline distill.distill_type=none':
        ("elsewhere", "test_compare.py::test_tiny_sweep_compared_end_to_end"),
    'python -m deit_train -m experiment=quickstart distill=none,hard,kd seed=0,1,2 teacher.cache_dir=multirun/tcache hydra.sweep.dir=multirun/methods_1.0/logit':
        ("compose", "a measured sweep: its figures are in the table below it"),
    'python -m deit_train -m experiment=quickstart distill=dkd distill.warmup_epochs=3 seed=0,1,2 teacher.cache_dir=multirun/tcache hydra.sweep.dir=multirun/methods_1.0/dkd':
        ("compose", "a measured sweep: its figures are in the table below it"),
    'python -m deit_train -m experiment=quickstart distill=feature seed=0,1,2 hydra.sweep.dir=multirun/methods_1.0/feature':
        ("compose", "a measured sweep: its figures are in the table below it"),
    'python scripts/compare_runs.py multirun/methods_1.0/logit multirun/methods_1.0/dkd multirun/methods_1.0/feature --group-by distill.distill_type --baseline distill.distill_type=none':
        ("elsewhere", "test_compare.py::test_tiny_sweep_compared_end_to_end"),
    "python -m deit_train -m experiment=quickstart distill=kd,kd_hard seed=0,1,2 "
    "hydra.sweep.dir=multirun/tab3_cls": ("elsewhere", "test_losses.py"),
    "python scripts/compare_runs.py multirun/tab3_token multirun/tab3_cls --baseline distill=none --out tab3.png":
        ("elsewhere", "test_compare.py::test_tiny_sweep_compared_end_to_end"),
    'python -m deit_train -m experiment=quickstart distill=none,hard seed=0,1,2 '
    'data.train_fraction=0.1 data.batch_size=32 optim.base_lr=0.032 trainer.max_epochs=190 '
    'optim.warmup_epochs=13 trainer.check_val_every_n_epoch=10 '
    '\'teacher_recipe_overrides=["data.batch_size=32","optim.base_lr=0.128","trainer.max_epochs=76","optim.warmup_epochs=6"]\' '
    'hydra.sweep.dir=multirun/efficiency_0.1': ("compose", ""),
    'python -m deit_train -m experiment=quickstart distill=none,hard seed=0,1,2 '
    'data.train_fraction=0.25 trainer.max_epochs=140 optim.warmup_epochs=10 '
    'trainer.check_val_every_n_epoch=5 '
    '\'teacher_recipe_overrides=["trainer.max_epochs=57","optim.warmup_epochs=5"]\' '
    'hydra.sweep.dir=multirun/efficiency_0.25': ("compose", ""),
    'python scripts/compare_runs.py multirun/tab3_token multirun/efficiency_0.1 '
    'multirun/efficiency_0.25 --group-by data.train_fraction,distill.distill_type --baseline '
    'distill.distill_type=none':
        ("elsewhere", "test_compare.py::test_tiny_sweep_compared_end_to_end"),
    "python -m deit_train.eval ckpt=<file or directory> data=imagefolder data.root=/path/to/imagenet model=deit_small "
    "split=val out=metrics.json": ("elsewhere", "test_eval_formats.py::test_cli_writes_metrics_and_confusion_matrix"),
    "python scripts/eval_paper_table5.py --imagenet /path/to/imagenet --weights /path/to/official_deit_files":
        ("elsewhere", "test_eval_formats.py::test_table5_script_runs_eval_on_each_official_file_and_compares"),
    "python -m deit_train.teacher_cache experiment=<name> teacher.cache_dir=<dir> [overrides]":
        ("elsewhere", "test_logit_cache.py::test_teacher_only_pass_cli"),
    "python scripts/benchmark_data.py": ("elsewhere", "test_benchmark.py"),
    "python -m deit_train experiment=quickstart model.image_size=33":
        ("elsewhere", "test_preflight.py::test_bad_student_option_stops_before_the_teacher_is_bootstrapped"),
    "python scripts/benchmark_data.py --num-images 8 --rounds 1 --json data.json --markdown data.md":
        ("elsewhere", "test_benchmark_data.py"),
    "python -m deit_train.pack data=imagefolder data.root=/data/imagenet out=/nvme/imagenet-pack":
        ("options", "ImageNet: tests/test_shards.py packs small folders"),
    "python -m deit_train.pack data=hf data.path=/data/imagenet-hf out=/nvme/imagenet-pack":
        ("options", "a saved data set: tests/test_shards.py packs a small one"),
    "python -m deit_train experiment=deit_small_distill data=shards data.root=/nvme/imagenet-pack":
        ("compose", "a pack of ImageNet"),
    "python scripts/benchmark_pack.py --num-images 1000": ("not run", "a timed benchmark (minutes here)"),
    "scancel --signal=USR1 <job id>":
        ("elsewhere", "test_slurm.py::test_sigusr1_mid_epoch_saves_once_requeues_and_resumes_exactly"),
    "python -m deit_train -m hparams_search=quickstart_distill experiment=quickstart":
        ("elsewhere", "test_search.py::test_trials_sample_the_space_and_report_each_runs_recorded_metric"),
    "python -m deit_train -m hparams_search=deit_small_distill experiment=deit_small_distill hydra/launcher=slurm "
    "data.root=/path/to/imagenet teacher.checkpoint=/path/regnety_160.pth": ("compose", "ImageNet and GPUs"),
    "python -m deit_train.search storage=sqlite:///outputs/quickstart/search_quickstart_distill/optuna.db":
        ("elsewhere", "test_search.py::test_summary_plots_best_overrides_and_compare_read_the_search"),
    "python scripts/compare_runs.py outputs/quickstart/search_quickstart_distill":
        ("elsewhere", "test_search.py::test_summary_plots_best_overrides_and_compare_read_the_search"),
    "python scripts/benchmark_search.py": ("not run", "a timed benchmark (minutes here)"),
    "python -m deit_train experiment=quickstart seed=1 teacher.checkpoint=teachers/regnetx_002_digits_seed1.pth "
    "trainer.max_epochs=1 optim.warmup_epochs=0": ("compose", "bootstraps a second digits teacher (minutes)"),
    "python -m deit_train -m experiment=quickstart distill=hard seed=0,1,2 data.train_fraction=0.1 "
    "teacher.checkpoint=teachers/regnetx_002_digits_seed1.pth teacher.cache_dir=multirun/tcache data.batch_size=32 "
    "optim.base_lr=0.032 trainer.max_epochs=190 optim.warmup_epochs=13 trainer.check_val_every_n_epoch=10 "
    "hydra.sweep.dir=multirun/teachers_0.1/B": ("compose", "a measured sweep: its figures are in the table below it"),
    "python -m deit_train -m experiment=quickstart distill=hard seed=0,1,2 data.train_fraction=0.1 teacher=ensemble "
    "teacher@teacher.members.0=regnetx_002_digits "
    "teacher.members.0.checkpoint=$HOME/.cache/deit_train/teachers/regnetx_002_digits.pth "
    "teacher@teacher.members.1=regnetx_002_digits teacher.members.1.checkpoint=teachers/regnetx_002_digits_seed1.pth "
    "teacher.cache_dir=multirun/tcache data.batch_size=32 optim.base_lr=0.032 trainer.max_epochs=190 "
    "optim.warmup_epochs=13 trainer.check_val_every_n_epoch=10 hydra.sweep.dir=multirun/teachers_0.1/ensemble":
        ("compose", "a measured sweep: its figures are in the table below it"),
    "python scripts/compare_runs.py multirun/methods_0.1/logit multirun/teachers_0.1/B multirun/teachers_0.1/ensemble "
    "--group-by distill.distill_type,teacher.checkpoint,teacher.combine --baseline distill.distill_type=none":
        ("elsewhere", "test_compare.py::test_tiny_sweep_compared_end_to_end"),
    "python -m deit_train -m experiment=quickstart distill=soft distill.alpha=0.5094308292033188 "
    "distill.tau=3.4146545846368257 optim.base_lr=0.011447666136760272 model.drop_path_rate=0.0061602427310760745 "
    "seed=0,1,2 teacher.cache_dir=multirun/tcache hydra.sweep.dir=multirun/search_best":
        ("compose", "a measured sweep: its figures are in the table below it"),
    "python -m deit_train -m experiment=quickstart seed=0,1,2 teacher.cache_dir=multirun/tcache "
    "hydra.sweep.dir=multirun/search_defaults": ("compose", "a measured sweep: its figures are in the table below it"),
    "python scripts/compare_runs.py multirun/search_defaults multirun/search_best --group-by distill.distill_type "
    "--baseline distill.distill_type=hard": ("elsewhere", "test_compare.py::test_tiny_sweep_compared_end_to_end"),
    "python scripts/gpu_smoke.py": ("elsewhere", "test_gpu_smoke.py::test_every_row_runs_and_the_table_reports_it"),
    "python scripts/gpu_smoke.py --rows distill,compiled --keep smoke_runs":
        ("elsewhere", "test_gpu_smoke.py::test_every_row_runs_and_the_table_reports_it"),
}

# Console lines that count as warnings: Python's `file.py:123: ...` form, anything saying warn(ing) or
# deprecat(ed), and Lightning's tips.
WARNING_LINE = re.compile(r"\.py:\d+: |warn|deprecat|💡", re.IGNORECASE)
# Warnings the quickstart may print, each with why it stays. Empty: the quickstart prints none
# (deit_train/run/console.py lists what is silenced and why).
ALLOWED_WARNINGS: tuple[str, ...] = ()


def readme_commands(text: str) -> list[str]:
    """Lines of ```bash blocks (continuations joined, comments dropped) and inline `python|pip|sbatch|scripts/|
    pytest ...` spans outside them."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    prose = re.sub(r"\n\s*", " ", re.sub(r"```.*?```", "", text, flags=re.S))
    commands += [span for span in re.findall(r"`([^`]+)`", prose)
                 if re.match(r"(python3? |pip |sbatch |scripts/|pytest)", span)]
    return commands


def documented_commands() -> set[str]:
    return {command for document in DOCUMENTS for command in readme_commands(document.read_text())}


def test_every_readme_command_is_checked():
    commands = documented_commands()
    assert set(commands) == set(CHECKS), {"unchecked": sorted(set(commands) - set(CHECKS)),
                                          "no longer in the README or docs": sorted(set(CHECKS) - set(commands))}
    for command, (kind, where) in CHECKS.items():
        if kind == "elsewhere":  # the named test exists
            file, _, name = where.partition("::")
            assert (ROOT / "tests" / file).is_file() and (not name or f"def {name}(" in (ROOT / "tests" / file).read_text()), where


def _one_job(overrides: list[str]) -> list[str]:
    """A sweep's first job: ``a=x,y`` -> ``a=x`` (plain comma lists only, not dict values)."""
    return [re.sub(r"^([\w./]+=[\w./-]+),[\w.,/-]+$", r"\1", o) for o in overrides]


@pytest.mark.parametrize("command", [c for c, (kind, _) in CHECKS.items() if kind == "compose"])
def test_readme_command_composes(command, tmp_path):
    words = shlex.split(re.sub(r"<[^>]+>", "placeholder", command))  # placeholders filled in, as a user does
    assert words[:3] == ["python", "-m", "deit_train"]
    overrides = _one_job([w for w in words[3:] if w != "-m"])
    cfg = compose_config(overrides, tmp_path)
    groups = {p.name for p in CONFIG_DIR.iterdir() if p.is_dir()}
    for override in overrides:  # plain values land where typed (group choices: composing at all checks them)
        key, value = override.split("=", 1)
        if key not in groups and "/" not in key and "@" not in key and not value.startswith(("{", "[")) \
                and not key.startswith("hydra."):
            assert str(OmegaConf.select(cfg, key)).lower() == value.lower(), (key, value)


@pytest.mark.parametrize("command", [c for c, (kind, _) in CHECKS.items() if kind == "options"])
def test_readme_tool_options_parse(command):
    words = shlex.split(command)
    if words[2] == "deit_train.pack":  # a Hydra-composed command: its options compose (an unknown one raises)
        assert compose_pack_config(words[3:]).out == dict(w.split("=", 1) for w in words[3:])["out"]
        return
    tool = {"deit_train.benchmark": benchmark_cli}[words[2]]
    parse_args(tool.DEFAULTS, words[3:], tool.USAGE)


def _tool(tool, argv: list[str]) -> None:
    run_main(tool.main, tool.DEFAULTS, tool.USAGE, argv=argv)


def test_readme_quickstart_then_compare_export_predict(tmp_path, digits_teacher_file, monkeypatch, capsys):
    """The README's path in order, from an empty working directory; the quickstart's console has no warnings."""
    work = tmp_path / "work"
    work.mkdir()
    tiny = [f"teacher.checkpoint={digits_teacher_file}", "teacher.min_val_top1=0", "trainer.max_epochs=3", *FAST_DIGITS,
            "trainer.enable_progress_bar=false"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(DEIT_TRAIN_CACHE=str(tmp_path / "cache"), PYTHONPATH=os.pathsep.join(filter(None, [
        str(ROOT), env.get("PYTHONPATH")])))
    quickstart = subprocess.run([sys.executable, *shlex.split("python -m deit_train experiment=quickstart")[1:], *tiny],
                                cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert quickstart.returncode == 0, quickstart.stderr[-3000:]
    console = [line for line in (quickstart.stdout + quickstart.stderr).splitlines()
               if WARNING_LINE.search(line) and not any(re.search(a, line) for a in ALLOWED_WARNINGS)]
    assert console == []
    output = quickstart.stdout + quickstart.stderr  # the model summary, without the FLOPs Lightning did not count
    assert "Trainable params" in output and "flops" not in output.lower()
    (run,) = (work / "outputs" / "quickstart").iterdir()
    assert (run / "results.json").is_file() and (run / "csv" / "metrics.csv").is_file()

    # a bare run: one line naming the experiments, nothing trained
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["deit_train"])
    with pytest.raises(SystemExit) as bare:
        train_main()
    assert bare.value.code == 2 and capsys.readouterr().err.count("\n") == 1

    # two runs in outputs/quickstart (the second a copy), compared from the working directory
    shutil.copytree(run, run.with_name(run.name + "_copy"))
    assert compare_runs(shlex.split("python scripts/compare_runs.py outputs/quickstart")[2:]) == 0
    printed = capsys.readouterr().out
    assert run.name in printed and f"{run.name}_copy" in printed

    export = shlex.split("python -m deit_train.export ckpt=<run>/checkpoints/last.ckpt format=hf out=hf_model")
    _tool(export_cli, [w.replace("<run>", str(run.relative_to(work))) for w in export[3:]])
    assert (work / "hf_model" / "config.json").is_file() and (work / "hf_model" / "preprocessor_config.json").is_file()

    images = work / "digits"
    images.mkdir()
    for i, digit in enumerate(load_digits().images[:2]):
        Image.fromarray((digit * 255 / 16).astype(np.uint8)).save(images / f"{i}.png")
    predict = shlex.split("python -m deit_train.predict ckpt=... images=<folder or [a.png,b.png]> top_k=5 "
                          "--attention [image_size=384]")
    argv = {"ckpt=...": f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "images=<folder": f"images={images}",
            "or": None, "[a.png,b.png]>": None, "[image_size=384]": "image_size=32"}  # 384 px: slow on CPU
    _tool(predict_cli, [argv.get(w, w) for w in predict[3:] if argv.get(w, w)])
    assert (work / "predictions" / "predictions.json").is_file()
    assert sorted(p.name for p in (work / "predictions").glob("*_attention.png")) == ["0_attention.png",
                                                                                     "1_attention.png"]


def test_readme_is_a_guide_whose_links_resolve():
    """The README stays short (details belong in docs/), and every local link in it and in docs/ points to a file."""
    assert len(README.read_text().splitlines()) <= 150
    for document in DOCUMENTS:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", document.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (document.parent / target).exists(), (document.name, target)
