"""Pack and read rates of packed shards, per core of CPU time, on synthetic ImageNet-like JPEGs.

Writes ``--num-images`` textured JPEGs in ImageNet layout (10 classes; sizes like ImageNet's: most 500 px on the
long side, some smaller, about 1 in 10 larger, up to 2000 px), packs them with ``deit_train.data.pack.pack_folder``
and times, counting the CPU time of every process involved (a loaded machine's wall clock says little):

    pack            the whole command: listing, packing workers, and the read-back digest pass
    pack_workers    the packing workers alone (header parse, resize + re-encode of images above max_side, writing)
    read_bytes      random-order reads of stored items (PackedImages.read), no decode
    read_decode     random-order reads + decode to RGB, from the pack ...
    folder_decode   ... and the same from the image files

    python scripts/benchmark_pack.py [--num-images 400] [--workers 1] [--max-side 512] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def _cpu() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): 70% 500 px on the long side, 20% 250-499, 10% 513-2000; landscape 3 times in 4."""
    draw = rng.uniform()
    long_side = 500 if draw < 0.7 else int(rng.integers(250, 500)) if draw < 0.9 else int(rng.integers(513, 2001))
    short_side = int(round(long_side * rng.choice([0.75, 0.667, 0.8, 1.0], p=[0.5, 0.25, 0.15, 0.1])))
    return (long_side, short_side) if rng.uniform() < 0.75 else (short_side, long_side)


def write_folder(root: Path, count: int, seed: int = 0) -> list[Path]:
    """Smooth colour fields plus noise (compress like photos) in root/{train,val}/class<k>/; val gets 1 in 10."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        width, height = imagenet_like_size(rng)
        yy, xx = np.mgrid[0:height, 0:width]
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([127 + 100 * np.sin(xx / (20 + 7 * c) + yy / (31 + 5 * c) + phase[c]) for c in range(3)], -1)
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        folder = root / ("val" if (i // 10) % 10 == 9 else "train") / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def rate(count: int, work) -> tuple[float, float]:
    """(images per CPU second, images per wall second) of ``work()`` handling ``count`` images."""
    cpu, wall = _cpu(), time.perf_counter()
    work()
    return count / (_cpu() - cpu), count / (time.perf_counter() - wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--max-side", type=int, default=512)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    from deit_train.data import pack as packing
    from deit_train.data.images import load_rgb
    from deit_train.data.shards import ShardsDataModule

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_folder(Path(tmp) / "folder", args.num_images)
        sides = np.array([max(Image.open(p).size) for p in paths])
        source_bytes = sum(p.stat().st_size for p in paths)

        started = time.perf_counter()
        cpu = _cpu()
        meta = packing.pack_folder(Path(tmp) / "folder", Path(tmp) / "pack", max_side=args.max_side,
                                   workers=args.workers)
        rows["pack"] = (args.num_images / (_cpu() - cpu), args.num_images / (time.perf_counter() - started))
        # the read-back pass alone, repeated (what pack spends after its workers)
        rows["digest_pass"] = rate(args.num_images, lambda: [
            packing._read_back(Path(tmp) / "pack", split, meta["splits"][split]["labels"])
            for split in meta["splits"]])
        pack_cpu = args.num_images / rows["pack"][0]
        rows["pack_workers"] = (args.num_images / (pack_cpu - args.num_images / rows["digest_pass"][0]), None)
        pack_bytes = sum(p.stat().st_size for p in (Path(tmp) / "pack").rglob("chunk-*.bin"))

        dm = ShardsDataModule(root=str(Path(tmp) / "pack"), num_workers=0)
        dm.setup()
        train = dm.train_set
        order = np.random.default_rng(1).permutation(len(train))
        train.read(0)  # opens the reader
        rows["read_bytes"] = rate(len(order), lambda: [train.read(int(i)) for i in order])
        rows["read_decode"] = rate(len(order), lambda: [load_rgb(train.read(int(i))["image"]) for i in order])
        files = [Path(tmp) / "folder" / "train" / str(train.read(int(i))["name"]).split("/", 1)[1] for i in order]
        rows["folder_decode"] = rate(len(files), lambda: [load_rgb(p) for p in files])

    summary = {"images": args.num_images, "median_long_side": int(np.median(sides)),
               "above_max_side": int((sides > args.max_side).sum()), "max_side": args.max_side,
               "source_MB": round(source_bytes / 2**20, 1), "pack_MB": round(pack_bytes / 2**20, 1),
               "workers": args.workers,
               "rows": {name: {"img_per_cpu_s": round(cpu_rate, 1),
                               "img_per_wall_s": None if wall is None else round(wall, 1)}
                        for name, (cpu_rate, wall) in rows.items()}}
    print(f"{summary['images']} images (median long side {summary['median_long_side']} px, "
          f"{summary['above_max_side']} above max_side={args.max_side}), {summary['source_MB']} MB as files, "
          f"{summary['pack_MB']} MB packed; {args.workers} packing worker(s)")
    print("| stage | img/s per core (CPU time) | img/s wall |\n|---|---|---|")
    for name, row in summary["rows"].items():
        print(f"| {name} | {row['img_per_cpu_s']} | {row['img_per_wall_s'] if row['img_per_wall_s'] else '-'} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
