"""The GPU smoke check: every path a first GPU run takes, through the CLI, within 8 minutes on one GPU (estimated:
no GPU has run it yet).

Each row is one ``python -m deit_train`` run (2 epochs, the last timed, validation on; the tiny form's one epoch times
nothing) of a DeiT-S student distilled from a random-weight RegNetY-16GF teacher file (``timm.create_model(
"regnety_160")`` saved locally; nothing is downloaded), on ``data=fake``:

    plain            no distillation, bf16-mixed (the teacher share's reference)
    distill          bf16-mixed, teacher eager
    compiled         module.compile=true teacher.compile=true
    ema              module.ema_decay=0.999
    cache write      teacher.cache_dir=D (first run writes the teacher's logits)
    cache read       teacher.cache_dir=D (second run reads them)
    fp16 + clip      trainer.precision=16-mixed trainer.gradient_clip_val=1.0
    ddp x2 + ema     strategy=ddp trainer.devices=2 module.ema_decay=0.999 (only with 2 GPUs or more)

and the data path a first ImageNet run takes, on a generated folder of photo-like JPEGs (ImageNet sizes; 16-64 px in
the tiny form) and its pack (``deit_train.pack``'s ``pack_folder``, what ``python -m deit_train.pack`` runs),
``augment=deit``:

    jpeg uint8           the folder, uint8 workers (the default): normalisation and erasing on the device
    jpeg device          augment.device=true (RandAugment on the device)
    pack device decode   the pack, augment.device=true augment.device_decode=true (nvJPEG)
    pack bf16-true       the same, trainer.precision=bf16-true
    decode under load    the same, 200 steps (tiny: the epoch's), each batch's device decode compared with the CPU
                         decode of the same bytes and draws while training runs

It prints one table and writes the same as JSON (``--json``): img/s, the teacher's share of a step (1 - img/s /
plain img/s), host syncs per training step (CUDA: the "synchronizing CUDA operation" warnings of
``torch.cuda.set_sync_debug_mode("warn")`` per step, after the first; scripts/smoke_probe.py), recompilations
(TORCH_LOGS), the teacher's device/precision/memory format (its start-up line), peak memory (CUDA: max allocated;
CPU: peak RSS), the largest difference from the CPU path in grey levels (the JPEG rows: the device stage's output
against the same stage on the CPU for the same batch and draws; decode under load: the decoded crops), whether the
class/distillation-token cosine curve (token diagnostics) is filled, and each run's exit code. A failing row is
reported, not fatal; the script exits 1 when any row failed.

    python scripts/gpu_smoke.py --json smoke.json  # on a GPU machine (budget: 8 minutes on one GPU; not run yet)
    python scripts/gpu_smoke.py --tiny             # the reduced CPU form tests/test_gpu_smoke.py runs
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cli_runs import ROOT, last_epoch_throughput, metrics_rows, random_teacher_file, run_cli

sys.path.insert(0, str(ROOT))  # deit_train's pack, as the CLI runs it from the repository root

PROBE = ROOT / "scripts" / "smoke_probe.py"  # the CLI's own entry, measured from inside (peak, syncs, pixels)
DECODE_STEPS = 200  # decode under load: batches compared (GPU form)
JPEG_CLASSES = 10
_TEACHER_LINE = re.compile(r"teacher (\S+) on (\w+): (\w+), torch\.(\w+)")
_RECOMPILE = re.compile(r"Recompiling function")


@dataclass
class Row:
    name: str
    overrides: list[str] = field(default_factory=list)
    distilled: bool = True
    data: str = "fake"  # fake | folder (the generated JPEGs) | pack (their pack)
    compare: str = "none"  # none | stage | decode (scripts/smoke_probe.py)


def jpeg_rows() -> list[Row]:
    """The data path's rows: the generated JPEG folder and its pack, augment=deit."""
    device, decode = ["augment.device=true"], ["augment.device=true", "augment.device_decode=true"]
    return [Row("jpeg uint8", [], data="folder", compare="stage"),
            Row("jpeg device", device, data="folder", compare="stage"),
            Row("pack device decode", decode, data="pack", compare="stage"),
            Row("pack bf16-true", [*decode, "trainer.precision=bf16-true"], data="pack", compare="stage"),
            Row("decode under load", decode, data="pack", compare="decode")]


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
    return table + jpeg_rows()


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


def write_jpegs(root: Path, tiny: bool, per_class: int) -> Path:
    """An ImageNet-layout folder of photo-like RGB JPEGs (smooth colour waves and sensor-like noise, quality 90):
    ImageNet's sizes (most 500 px on the long side, some larger: the pack keeps or resizes them) or, tiny, 16-64 px;
    ``per_class`` training images per class, 2 validation images."""
    rng = np.random.default_rng(0)
    sizes = [(48, 40), (40, 56), (64, 48)] if tiny else [(500, 375), (375, 500), (500, 333), (640, 480), (800, 600)]
    for split, count in (("train", per_class), ("val", 2)):
        for label in range(JPEG_CLASSES):
            folder = root / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                width, height = sizes[(label + n) % len(sizes)]
                yy, xx = np.mgrid[0:height, 0:width]
                phase = rng.uniform(0, 2 * np.pi, 3)
                waves = np.stack([127 + 100 * np.sin(xx / (20 + 7 * c + label) + yy / (31 + 5 * c) + phase[c])
                                  for c in range(3)], -1)
                pixels = np.clip(waves + rng.normal(0, 12, waves.shape), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
                (folder / f"{n:04d}.jpg").write_bytes(buffer.getvalue())
    return root


def pack_jpegs(folder: Path, pack: Path, workers: int) -> None:
    """The folder's pack: what ``python -m deit_train.pack data=imagefolder data.root=<folder> out=<pack>`` runs
    (in this process: one interpreter start less)."""
    from deit_train.data.pack import pack_folder

    pack_folder(folder, pack, workers=workers)


def data_overrides(row: Row, common: list[str], sources: dict[str, Path], steps: int,
                   decode_steps: int) -> list[str]:
    """``common`` with the row's data source: data=fake as it is, or the JPEG folder / pack with augment=deit (the
    decode row trains long enough to compare ``decode_steps`` batches)."""
    if row.data == "fake":
        return common
    kept = [a for a in common if not a.startswith(("data=", "data.num_train=", "data.num_val="))]
    source = ["data=imagefolder" if row.data == "folder" else "data=shards", f"data.root={sources[row.data]}",
              "augment=deit"]
    if row.compare == "decode" and decode_steps > steps:
        kept = [a for a in kept if not a.startswith("trainer.max_epochs=")]
        source.append(f"trainer.max_epochs={math.ceil(decode_steps / steps)}")
    return [*kept, *source]


def cosine_filled(run_dir: Path) -> bool:
    """Whether the last validation row has a cosine for every block (the token diagnostics' curve)."""
    validated = [r for r in metrics_rows(run_dir) if r.get("val/top1")]
    layers = [k for k in (validated[-1] if validated else {}) if k.startswith("diag/cls_dist_cos/layer_")]
    return bool(layers) and all(validated[-1][k] for k in layers)


def measure(row: Row, common: list[str], teacher_file: Path, workdir: Path, decode_steps: int = DECODE_STEPS) -> dict:
    run_dir = workdir / row.name.replace(" ", "_").replace("+", "plus")
    probe_file = workdir / f"{run_dir.name}.probe.json"
    if row.distilled:
        args = ["experiment=deit_small_distill", *common, *row.overrides, f"teacher.checkpoint={teacher_file}"]
    else:
        args = ["experiment=deit_small", *(a for a in common if not a.startswith("teacher.")), *row.overrides]
    started = time.perf_counter()
    probe_args = (str(PROBE), str(probe_file), row.compare, *([str(decode_steps)] if row.compare == "decode" else []))
    proc = run_cli(args, run_dir, env={"TORCH_LOGS": "recompiles", "DEIT_TRAIN_CACHE": str(workdir / "cache")},
                   entry=probe_args)
    output = proc.stdout + proc.stderr
    teacher = _TEACHER_LINE.search(output)
    probe = json.loads(probe_file.read_text()) if probe_file.is_file() else None
    syncs = probe["syncs_per_step"] if probe else None
    return {"name": row.name, "exit": proc.returncode, "img_s": last_epoch_throughput(run_dir),
            "syncs_per_step": round(syncs, 2) if syncs is not None else None,
            "steps": probe["steps"] if probe else None,
            "recompiles": len(_RECOMPILE.findall(output)),
            "teacher": "/".join(teacher.group(2, 3, 4)) if teacher else None,
            "peak_mb": round(probe["peak_mb"]) if probe else None, "peak_kind": probe["kind"] if probe else None,
            "max_diff": probe["max_diff"] if probe else None, "compared": probe["compared"] if probe else 0,
            "cosine": cosine_filled(run_dir) if row.distilled else None, "wall_s": round(time.perf_counter() - started),
            "error": None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1:]}


def table(results: list[dict]) -> str:
    plain = next((r["img_s"] for r in results if r["name"] == "plain"), None)
    lines = ["| row | exit | img/s | teacher share | host syncs/step | recompiles | teacher (device/precision/format) "
             "| peak MB | max px diff (batches) | cosine curve | s |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|"]
    for r in results:
        share = (f"{1 - r['img_s'] / plain:.0%}" if r["name"] != "plain" and r["img_s"] and plain else "")
        cosine = {None: "n/a", True: "filled", False: "EMPTY"}[r["cosine"]]
        peak = f"{r['peak_mb']} ({r['peak_kind']})" if r["peak_mb"] is not None else ""
        img_s = f"{r['img_s']:.1f}" if r["img_s"] else ""
        syncs = f"{r['syncs_per_step']:g}" if r.get("syncs_per_step") is not None else "n/a"
        diff = f"{r['max_diff']:g} ({r['compared']})" if r.get("max_diff") is not None else ""
        lines.append(f"| {r['name']} | {r['exit']} | {img_s} | {share} | {syncs} | {r['recompiles']} "
                     f"| {r['teacher'] or ''} | {peak} | {diff} | {cosine} | {r['wall_s']} |")
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
    parser.add_argument("--decode-steps", type=int, default=None,
                        help=f"decode under load: batches compared (default {DECODE_STEPS}; tiny: the epoch's)")
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
        teacher_name = "regnetx_002" if args.tiny else "regnety_160"
        teacher_file = random_teacher_file(workdir / "teacher.pth", teacher_name)
        common = common_overrides(args.tiny, steps, batch_size, epochs)
        selected = [r for r in rows(workdir / "logit_cache", gpus)
                    if not args.rows or r.name in args.rows.split(",")]
        sources = {}
        if any(r.data != "fake" for r in selected):  # the JPEG rows' data, and a teacher of its class count
            per_class = math.ceil(batch_size * steps / JPEG_CLASSES)
            sources["folder"] = write_jpegs(workdir / "jpegs", args.tiny, per_class)
            sources["pack"] = workdir / "jpegs_pack"
            if not (sources["pack"] / "pack.json").is_file():
                pack_jpegs(sources["folder"], sources["pack"], workers=1 if args.tiny else 8)
            jpeg_teacher = random_teacher_file(workdir / "teacher_jpeg.pth", teacher_name, num_classes=JPEG_CLASSES)
        decode_steps = args.decode_steps or (steps if args.tiny else DECODE_STEPS)
        results = []
        for row in selected:
            row_common = data_overrides(row, common, sources, steps, decode_steps)
            teacher = jpeg_teacher if row.data != "fake" else teacher_file
            results.append(measure(row, row_common, teacher, workdir, decode_steps=decode_steps))
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
