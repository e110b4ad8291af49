"""Wall clock of a hyperparameter search with the teacher-logit cache against the same search with a live teacher.

Two runs of the command a user types, on the digits (CPU), one after the other:

    live    python -m deit_train -m hparams_search=quickstart_distill experiment=quickstart teacher.cache_dir=null ...
    cached  python -m deit_train -m hparams_search=quickstart_distill experiment=quickstart ...  (the search's default:
            the first trial writes the teacher's logits, the other trials read them)

Same seed, space, trials (no pruning, so both train the same trials) and a random-weight teacher file (no download,
``teacher.min_val_top1=0``); each search in its own sweep directory. The figure is the ratio of the two wall clocks
(process start to exit, the search's report included), and of their CPU seconds (steadier where other work shares the
machine); the two studies' objectives are checked equal trial by trial
(the cache stores all 10 digit classes in float32 here, so the cached teacher term is the live one).

    python scripts/benchmark_search.py                               # 6 trials x 2 epochs x 10 steps, regnetx_002
    python scripts/benchmark_search.py --teacher regnety_040 --json out.json
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from cli_runs import random_teacher_file, run_cli


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def search(name: str, args: list[str], workdir: Path) -> tuple[float, float, list[float | None]]:
    """Wall-clock and CPU seconds of the search's process, and its trials' objective values in trial order."""
    sweep_dir = workdir / name
    started, cpu_before = time.perf_counter(), _children_cpu_s()
    proc = run_cli(["-m", *args, f"hydra.sweep.dir={sweep_dir}"], workdir / f"{name}_unused",
                   env={"DEIT_TRAIN_CACHE": str(workdir / "home_cache")})
    seconds, cpu_seconds = time.perf_counter() - started, _children_cpu_s() - cpu_before
    if proc.returncode != 0:
        sys.exit(f"{name} search failed:\n{proc.stderr[-3000:]}")
    study = optuna.load_study(study_name="quickstart_distill", storage=f"sqlite:///{sweep_dir}/optuna.db")
    return seconds, cpu_seconds, [t.value for t in study.get_trials()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="training steps per epoch")
    parser.add_argument("--teacher", default="regnetx_002", help="timm model of the (random-weight) teacher")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher = random_teacher_file(workdir / f"{args.teacher}.pth", args.teacher, num_classes=10)
        common = ["hparams_search=quickstart_distill", "experiment=quickstart", f"teacher.model_name={args.teacher}",
                  f"teacher.checkpoint={teacher}", "teacher.min_val_top1=0", f"trainer.max_epochs={args.epochs}",
                  f"trainer.limit_train_batches={args.steps}", "trainer.enable_progress_bar=false",
                  f"hydra.sweeper.n_trials={args.trials}", "hydra.sweeper.pruner=null",
                  "teacher.cache_dtype=float32"]  # stored exactly: the cached search trains as the live one
        live_s, live_cpu_s, live = search("live", [*common, "teacher.cache_dir=null"], workdir)
        cached_s, cached_cpu_s, cached = search("cached", common, workdir)
    result = {
        "setup": f"{args.trials}-trial quickstart_distill search on the digits, teacher {args.teacher} (random "
                 f"weights), {args.steps} steps x {args.epochs} epochs per trial, CPU, {torch.get_num_threads()} "
                 "threads, one run each",
        "live_s": round(live_s, 1),
        "cached_s": round(cached_s, 1),
        "cached_vs_live": round(cached_s / live_s, 3),
        # CPU seconds of the search processes: the same comparison, less exposed to other work on a shared machine
        "live_cpu_s": round(live_cpu_s, 1),
        "cached_cpu_s": round(cached_cpu_s, 1),
        "cached_vs_live_cpu": round(cached_cpu_s / live_cpu_s, 3),
        "objectives_equal": live == cached,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
