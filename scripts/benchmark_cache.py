"""Training img/s with the teacher-logit cache, through the CLI a user runs: plain vs live teacher vs cached teacher.

Four runs of ``python -m deit_train`` on the same fake data and settings (``trainer=cpu data=fake``):

    plain    experiment=deit_tiny                              (no teacher: the target)
    live     experiment=deit_tiny_distill                      (teacher forward every step)
    write    experiment=deit_tiny_distill teacher.cache_dir=D  (first run: live teacher, writes the cache)
    cached   experiment=deit_tiny_distill teacher.cache_dir=D  (second run: reads the cache)

The teacher (RegNetY-16GF by default) has random weights saved to a local file. Figures are the last epoch's
``train/throughput`` from each run's ``csv/metrics.csv`` (the first epoch warms up); the cached run's per-step train
losses are checked against the writing run's.

    python scripts/benchmark_cache.py                                   # @224, batch 8, 10 steps x 2 epochs
    python scripts/benchmark_cache.py --image-size 32 --teacher regnetx_002 --steps 3 --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from cli_runs import last_epoch_throughput, metrics_rows, random_teacher_file, run_cli

def run(name: str, args: list[str], workdir: Path) -> dict:
    run_dir = workdir / name
    proc = run_cli(args, run_dir, env={"DEIT_TRAIN_CACHE": str(workdir / "home_cache")})
    if proc.returncode != 0:
        sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
    losses = [float(r["train/loss_step"]) for r in metrics_rows(run_dir) if r.get("train/loss_step")]
    return {"img_s": last_epoch_throughput(run_dir), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="training steps per epoch")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--teacher", default="regnety_160")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher_file = random_teacher_file(workdir / f"{args.teacher}.pth", args.teacher)
        common = ["trainer=cpu", "data=fake", f"model.image_size={args.image_size}",
                  f"data.batch_size={args.batch_size}",
                  f"data.num_train={args.steps * args.batch_size}", f"data.num_workers={args.num_workers}",
                  f"trainer.max_epochs={args.epochs}", f"trainer.limit_train_batches={args.steps}",
                  "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
                  "trainer.enable_progress_bar=false", "test=false",
                  "optim.min_lr=1e-6"]  # batch 8 peaks at 7.8e-6, below the ImageNet preset's min_lr
        distill = ["experiment=deit_tiny_distill", f"teacher.model_name={args.teacher}",
                   f"teacher.checkpoint={teacher_file}", *common]
        cache = [f"teacher.cache_dir={workdir / 'cache'}"]
        runs = {"plain": run("plain", ["experiment=deit_tiny", *common], workdir),
                "live": run("live", distill, workdir),
                "write": run("write", [*distill, *cache], workdir),
                "cached": run("cached", [*distill, *cache], workdir)}
        cache_bytes = sum(p.stat().st_size for p in (workdir / "cache").rglob("epoch0000-*.npy"))
    plain = runs["plain"]["img_s"]
    result = {
        "setup": f"DeiT-Ti @{args.image_size}, teacher {args.teacher}, data=fake, batch {args.batch_size}, "
                 f"{args.steps} steps x {args.epochs} epochs (last epoch timed), {torch.get_num_threads()} threads",
        **{f"{name}_img_s": round(r["img_s"], 2) for name, r in runs.items()},
        **{f"{name}_vs_plain": round(r["img_s"] / plain, 3) for name, r in runs.items() if name != "plain"},
        "cache_bytes_per_epoch": cache_bytes,
        "cached_losses_equal_written": runs["cached"]["losses"] == runs["write"]["losses"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
