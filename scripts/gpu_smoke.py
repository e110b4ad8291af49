"""The GPU smoke check: every path a first GPU run takes, through the CLI, in under 8 minutes on one GPU.

Each row is one ``python -m deit_train`` run on ``data=fake`` (2 epochs, the last timed, validation on; the tiny
form's one epoch times nothing) of a DeiT-S student distilled from a random-weight RegNetY-16GF teacher file
(``timm.create_model("regnety_160")`` saved locally; nothing is downloaded):

    plain            no distillation, bf16-mixed (the teacher share's reference)
    distill          bf16-mixed, teacher eager
    compiled         module.compile=true teacher.compile=true
    ema              module.ema_decay=0.999
    cache write      teacher.cache_dir=D (first run writes the teacher's logits)
    cache read       teacher.cache_dir=D (second run reads them)
    fp16 + clip      trainer.precision=16-mixed trainer.gradient_clip_val=1.0
    ddp x2 + ema     strategy=ddp trainer.devices=2 module.ema_decay=0.999 (only with 2 GPUs or more)

It prints one table: img/s, the teacher's share of a step (1 - img/s / plain img/s), recompilations (TORCH_LOGS),
the teacher's device/precision/memory format (its start-up line), peak memory (CUDA: max allocated; CPU: peak RSS),
whether the class/distillation-token cosine curve (token diagnostics) is filled, and each run's exit code. A failing
row is reported, not fatal; the script exits 1 when any row failed.

    python scripts/gpu_smoke.py                    # on a GPU machine (about 5 minutes on one H100-class GPU)
    python scripts/gpu_smoke.py --tiny             # the reduced CPU form tests/test_gpu_smoke.py runs
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cli_runs import last_epoch_throughput, metrics_rows, random_teacher_file, run_cli

# The CLI's own entry, run so that the process reports its peak memory when it exits (rank 0 under DDP).
_PEAK_PROBE = """
import atexit, json, resource, runpy, sys, torch
def _peak(path=sys.argv.pop(1)):
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    with open(path, "w") as handle:
        json.dump({"peak_mb": peak, "kind": "cuda" if cuda else "rss"}, handle)
atexit.register(_peak)
runpy.run_module("deit_train", run_name="__main__", alter_sys=True)
"""
_TEACHER_LINE = re.compile(r"teacher (\S+) on (\w+): (\w+), torch\.(\w+)")
_RECOMPILE = re.compile(r"Recompiling function")


@dataclass
class Row:
    name: str
    overrides: list[str] = field(default_factory=list)
    distilled: bool = True


def rows(cache_dir: Path, gpus: int) -> list[Row]:
    table = [Row("plain", [], distilled=False),
             Row("distill", []),
             Row("compiled", ["module.compile=true", "teacher.compile=true"]),
             Row("ema", ["module.ema_decay=0.999"]),
             Row("cache write", [f"teacher.cache_dir={cache_dir}"]),
             Row("cache read", [f"teacher.cache_dir={cache_dir}"]),
             Row("fp16 + clip", ["trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0"])]
    if gpus >= 2:
        table.append(Row("ddp x2 + ema", ["strategy=ddp", "trainer.devices=2", "module.ema_decay=0.999"]))
    return table


def common_overrides(tiny: bool, steps: int, batch_size: int, epochs: int = 2) -> list[str]:
    """The settings every row shares: full DeiT-S @224 on a GPU, or a tiny student on the CPU (--tiny)."""
    common = ["data=fake", f"data.batch_size={batch_size}", f"data.num_train={batch_size * steps}",
              f"data.num_val={batch_size * 2}", f"trainer.max_epochs={epochs}",
              "trainer.limit_val_batches=2", "trainer.num_sanity_val_steps=0", "trainer.log_every_n_steps=1",
              "trainer.enable_progress_bar=false", "test=false", "optim.warmup_epochs=0", "optim.min_lr=1e-6"]
    if tiny:
        return [*common, "trainer=cpu", "data.num_workers=0", "model.image_size=32", "model.patch_size=8",
                "model.hidden_size=32", "model.num_hidden_layers=2", "model.num_attention_heads=2",
                "teacher.model_name=regnetx_002", "teacher.min_val_top1=0"]
    return [*common, "trainer=gpu", "trainer.devices=1", "data.num_workers=8", "teacher.min_val_top1=0"]


def cosine_filled(run_dir: Path) -> bool:
    """Whether the last validation row has a cosine for every block (the token diagnostics' curve)."""
    validated = [r for r in metrics_rows(run_dir) if r.get("val/top1")]
    layers = [k for k in (validated[-1] if validated else {}) if k.startswith("diag/cls_dist_cos/layer_")]
    return bool(layers) and all(validated[-1][k] for k in layers)


def measure(row: Row, common: list[str], teacher_file: Path, workdir: Path) -> dict:
    run_dir = workdir / row.name.replace(" ", "_").replace("+", "plus")
    peak_file = workdir / f"{run_dir.name}.peak.json"
    if row.distilled:
        args = ["experiment=deit_small_distill", *common, *row.overrides, f"teacher.checkpoint={teacher_file}"]
    else:
        args = ["experiment=deit_small", *(a for a in common if not a.startswith("teacher.")), *row.overrides]
    started = time.perf_counter()
    proc = run_cli(args, run_dir, env={"TORCH_LOGS": "recompiles", "DEIT_TRAIN_CACHE": str(workdir / "cache")},
                   entry=("-c", _PEAK_PROBE, str(peak_file)))
    output = proc.stdout + proc.stderr
    teacher = _TEACHER_LINE.search(output)
    peak = json.loads(peak_file.read_text()) if peak_file.is_file() else None
    return {"name": row.name, "exit": proc.returncode, "img_s": last_epoch_throughput(run_dir),
            "recompiles": len(_RECOMPILE.findall(output)),
            "teacher": "/".join(teacher.group(2, 3, 4)) if teacher else None,
            "peak_mb": round(peak["peak_mb"]) if peak else None, "peak_kind": peak["kind"] if peak else None,
            "cosine": cosine_filled(run_dir) if row.distilled else None, "wall_s": round(time.perf_counter() - started),
            "error": None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1:]}


def table(results: list[dict]) -> str:
    plain = next((r["img_s"] for r in results if r["name"] == "plain"), None)
    lines = ["| row | exit | img/s | teacher share | recompiles | teacher (device/precision/format) | peak MB "
             "| cosine curve | s |", "|---|---:|---:|---:|---:|---|---:|---|---:|"]
    for r in results:
        share = (f"{1 - r['img_s'] / plain:.0%}" if r["name"] != "plain" and r["img_s"] and plain else "")
        cosine = {None: "n/a", True: "filled", False: "EMPTY"}[r["cosine"]]
        peak = f"{r['peak_mb']} ({r['peak_kind']})" if r["peak_mb"] is not None else ""
        img_s = f"{r['img_s']:.1f}" if r["img_s"] else ""
        lines.append(f"| {r['name']} | {r['exit']} | {img_s} | {share} | {r['recompiles']} | {r['teacher'] or ''} "
                     f"| {peak} | {cosine} | {r['wall_s']} |")
    for r in results:
        if r["error"]:
            lines.append(f"\n{r['name']} failed: {r['error'][0] if r['error'] else ''}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the reduced CPU form: tiny student and teacher")
    parser.add_argument("--steps", type=int, default=None, help="training steps per epoch (default 30; tiny 2)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per row, the last timed (default 2: the first warms up; tiny 1: no timing)")
    parser.add_argument("--batch-size", type=int, default=None, help="per device (default 64; tiny 4)")
    parser.add_argument("--rows", default=None, help="comma-separated row names to run (default: all)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--keep", default=None, help="keep the run directories here (default: a temporary folder)")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.tiny else 30)
    epochs = args.epochs or (1 if args.tiny else 2)
    batch_size = args.batch_size or (4 if args.tiny else 64)
    gpus = 0 if args.tiny else torch.cuda.device_count()
    if not args.tiny and gpus == 0:
        parser.error("no CUDA GPU here: run the reduced CPU form with --tiny")

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.keep or tmp).resolve()
        teacher_file = random_teacher_file(workdir / "teacher.pth", "regnetx_002" if args.tiny else "regnety_160")
        common = common_overrides(args.tiny, steps, batch_size, epochs)
        selected = [r for r in rows(workdir / "logit_cache", gpus)
                    if not args.rows or r.name in args.rows.split(",")]
        results = []
        for row in selected:
            results.append(measure(row, common, teacher_file, workdir))
            print(f"{row.name}: exit {results[-1]['exit']} in {results[-1]['wall_s']} s", flush=True)
    device = "CPU (tiny form)" if args.tiny else f"{gpus} x {torch.cuda.get_device_name()}"
    print(f"\nGPU smoke check: {device}, torch {torch.__version__}, batch {batch_size}, "
          f"{steps} steps x {epochs} epochs\n")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return int(any(r["exit"] != 0 for r in results))


if __name__ == "__main__":
    sys.exit(main())
