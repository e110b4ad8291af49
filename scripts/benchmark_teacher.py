"""What distillation costs: train img/s of a DeiT-Ti/16 student with and without a RegNetY-16GF teacher.

Every row is a real ``python -m deit_train`` run (``data=fake``, batch 8, ``trainer.precision`` as given) and reads
``train/throughput`` of its last epoch from ``csv/metrics.csv``, the figure runs are compared by; the first epoch
is warm-up (kernel selection, compilation). The teacher is a random-weight ``regnety_160`` saved to a local file.

    no distillation          experiment=deit_tiny
    plain fp32 teacher       experiment=deit_tiny_distill teacher.lean=false teacher.precision=fp32 (the old teacher)
    lean <precision>         BatchNorm folded, channels_last, inference mode, teacher.precision=<precision>
    lean <precision> + compile

Each row's img/s is also given as a ratio to the no-distillation row, and the teacher's share of a distilled
step as ``1 - distilled img/s / plain img/s``. The teacher's rate is its forward's FLOPs (counted) over the time it adds
to a step; a ratio of 0.50 needs a teacher no slower than the plain step, i.e. the rate printed below the table.

    python scripts/benchmark_teacher.py --repeats 3                      # CPU: rows above, precisions auto,fp32
    python scripts/benchmark_teacher.py --precisions auto,fp32,bf16 --device gpu --model deit_small --batch-size 128
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from cli_runs import last_epoch_throughput, random_teacher_file, run_cli


@dataclass
class Row:
    """One benchmark run: a name and the overrides that make it."""

    name: str
    overrides: list[str] = field(default_factory=list)
    distilled: bool = True


def rows(precisions: list[str], compile_precision: str | None) -> list[Row]:
    table = [Row("no distillation", ["experiment=deit_tiny"], distilled=False),
             Row("plain fp32 teacher", ["experiment=deit_tiny_distill", "teacher.lean=false", "teacher.precision=fp32"])]
    table += [Row(f"lean {p}", ["experiment=deit_tiny_distill", f"teacher.precision={p}"]) for p in precisions]
    if compile_precision:
        table.append(Row(f"lean {compile_precision} + compile",
                         ["experiment=deit_tiny_distill", f"teacher.precision={compile_precision}",
                          "teacher.compile=true"]))
    return table


def run(row: Row, common: list[str], teacher_file: Path, run_dir: Path) -> float:
    """img/s of the row's last epoch, through the CLI."""
    args = [*row.overrides, *common]
    if row.distilled:
        args.append(f"teacher.checkpoint={teacher_file}")
    proc = run_cli(args, run_dir)
    if proc.returncode != 0:
        raise SystemExit(f"{row.name} failed:\n{proc.stderr[-3000:]}")
    return last_epoch_throughput(run_dir)


def teacher_flops(batch_size: int, image_size: int) -> int:
    """FLOPs (2 per multiply-add) of one regnety_160 forward of a batch, counted on the meta device."""
    with torch.device("meta"):
        net = timm.create_model("regnety_160")
        images = torch.empty(batch_size, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(images)
    return counter.get_total_flops()


def markdown(report: dict) -> str:
    lines = [f"{report['setup']}", "", "| row | img/s | ratio to no distillation | teacher share of the step |",
             "|---|---:|---:|---:|"]
    for r in report["rows"]:
        share = "" if r["teacher_share"] is None else f"{r['teacher_share']:.0%}"
        lines.append(f"| {r['name']} | {r['img_s']:.2f} | {r['ratio']:.2f} | {share} |")
    rates = ", ".join(f"{r['name']} {r['teacher_gflop_s']:.0f}" for r in report["rows"] if r["teacher_gflop_s"])
    lines.append(f"\nteacher forward: {report['teacher_gflop']:.1f} GFLOP per batch, run at (GFLOP/s) {rates}; a ratio "
                 f"of 0.50 needs {report['gflop_s_for_half']:.0f} GFLOP/s")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_tiny", help="student config (model=<name>)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=6, help="train steps per epoch (2 epochs, the last is timed)")
    parser.add_argument("--precisions", default="auto,fp32", help="lean-teacher rows, from auto,fp32,bf16,fp16")
    parser.add_argument("--compile-precision", default="auto", help="precision of the compiled row ('' for none)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"], help="trainer=cpu|gpu")
    parser.add_argument("--student-precision", default=None, help="trainer.precision (default: the trainer's)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all rows (interleaved); median per row")
    parser.add_argument("--out", default="benchmark_teacher", help="JSON, markdown and run directories go here")
    args = parser.parse_args()

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # the step timer excludes data loading; no loader workers on CPU so the steps keep the cores
    workers = 0 if args.device == "cpu" else 4
    common = [f"model={args.model}", f"model.image_size={args.image_size}", "data=fake",
              f"data.batch_size={args.batch_size}", f"data.num_workers={workers}",
              f"data.num_train={args.batch_size * args.steps}", f"trainer={args.device}", "trainer.max_epochs=2",
              "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
              "~callbacks", "+trainer.enable_checkpointing=false", "optim.warmup_epochs=0", "test=false",
              "optim.min_lr=1e-6"]  # batch 8 peaks at 7.8e-6, below the ImageNet preset's min_lr
    if args.student_precision:
        common.append(f"trainer.precision={args.student_precision}")
    with tempfile.TemporaryDirectory() as tmp:  # the teacher loads from a local file, as in a real run
        teacher_file = random_teacher_file(Path(tmp) / "regnety_160.pth")
        table = rows(args.precisions.split(","), args.compile_precision or None)
        # rounds over all rows rather than one row at a time: a load change on the machine hits every row alike
        measured: dict[str, list[float]] = {row.name: [] for row in table}
        for round_ in range(args.repeats):
            for row in table:
                run_dir = out / f"{row.name.replace(' ', '_').replace('+', 'plus')}_{round_}"
                measured[row.name].append(run(row, common, teacher_file, run_dir))
                print(f"{row.name}: {measured[row.name][-1]:.2f} img/s", flush=True)
        results = [{"name": row.name, "img_s": round(statistics.median(measured[row.name]), 3),
                    "runs": [round(v, 3) for v in measured[row.name]]} for row in table]
    baseline = results[0]["img_s"]  # no distillation
    flops = teacher_flops(args.batch_size, args.image_size)
    for r, row in zip(results, table):
        r["ratio"] = round(r["img_s"] / baseline, 3)
        r["teacher_share"] = round(1 - r["img_s"] / baseline, 3) if row.distilled else None
        teacher_s = args.batch_size / r["img_s"] - args.batch_size / baseline  # what the teacher adds to a step
        r["teacher_gflop_s"] = round(flops / 1e9 / teacher_s, 1) if row.distilled and teacher_s > 0 else None
    device = torch.cuda.get_device_name() if args.device == "gpu" else f"CPU, {torch.get_num_threads()} threads"
    report = {"setup": f"{args.model} student @{args.image_size}, regnety_160 teacher (random weights), "
                       f"batch {args.batch_size}, data=fake, {args.steps} timed steps x {args.repeats}, {device}, "
                       f"torch {torch.__version__}",
              "rows": results, "teacher_gflop": round(flops / 1e9, 2),
              "gflop_s_for_half": round(flops / 1e9 / (args.batch_size / baseline), 1)}
    (out / "benchmark_teacher.json").write_text(json.dumps(report, indent=2))
    (out / "benchmark_teacher.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
