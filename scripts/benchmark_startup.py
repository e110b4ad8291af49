"""What freezing the imported objects (``deit_train.run.environment.freeze_imported_objects``, ``gc.freeze()`` at the
start of every command) saves a run: the same short digits run through ``python -m deit_train``, with the freeze and
with it made a no-op, alternately for ``--rounds`` rounds; prints each one's median wall time and their ratio.

The run is the test suite's kind (the quickstart's models at 16 px, one epoch of ``--batches`` batches, a random
10-class teacher file), so the process's start and exit weigh as they do in tests and short jobs.

    python scripts/benchmark_startup.py                # 3 rounds, one thread (a test worker, a 1-CPU Slurm task)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cli_runs import random_teacher_file, run_cli

# `python -m deit_train` through runpy, after optionally turning the freeze into a no-op (deit_train/__main__.py
# imports the function by name when it runs, so the module attribute is what it gets)
_ENTRY = """
import sys
if sys.argv.pop(1) == "off":
    import deit_train.run.environment as environment
    environment.freeze_imported_objects = lambda: None
import runpy
runpy.run_module("deit_train", run_name="__main__", alter_sys=True)
"""


def run_args(teacher_file: Path, batches: int) -> list[str]:
    return ["experiment=quickstart", f"teacher.checkpoint={teacher_file}", "teacher.min_val_top1=0",
            "trainer.max_epochs=1", "model.image_size=16", "model.patch_size=4", "model.hidden_size=32",
            "model.num_hidden_layers=2", "model.num_attention_heads=2", f"trainer.limit_train_batches={batches}",
            "trainer.limit_val_batches=2", "trainer.limit_test_batches=2", "data.batch_size=16",
            "optim.warmup_epochs=0", "trainer.enable_progress_bar=false"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each kind, alternating (default 3)")
    parser.add_argument("--batches", type=int, default=4, help="training batches of the one epoch (default 4)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the runs (default 1)")
    parser.add_argument("--json", default=None, help="also write the wall times to this JSON file")
    args = parser.parse_args(argv)

    walls: dict[str, list[float]] = {"freeze": [], "no freeze": []}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher = random_teacher_file(workdir / "teacher.pth", "regnetx_002", num_classes=10)
        env = {"OMP_NUM_THREADS": str(args.threads), "DEIT_TRAIN_CACHE": str(workdir / "cache")}
        for round_index in range(args.rounds):
            for name, switch in (("freeze", "on"), ("no freeze", "off")):
                started = time.perf_counter()
                proc = run_cli(run_args(teacher, args.batches), workdir / f"{switch}{round_index}", env=env,
                               entry=("-c", _ENTRY, switch))
                walls[name].append(time.perf_counter() - started)
                if proc.returncode != 0:
                    print(f"{name} run failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    return 1
                print(f"round {round_index + 1} {name}: {walls[name][-1]:.2f} s", flush=True)
    frozen, plain = statistics.median(walls["freeze"]), statistics.median(walls["no freeze"])
    print(f"\n| run | median wall s | ratio to no freeze |\n|---|---:|---:|\n| no freeze | {plain:.2f} | 1.00 |\n"
          f"| freeze | {frozen:.2f} | {frozen / plain:.2f} |\n\n{args.rounds} rounds, {args.threads} thread(s), "
          f"one epoch of {args.batches} batches; saved {plain - frozen:.2f} s a run")
    if args.json:
        Path(args.json).write_text(json.dumps(walls, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
