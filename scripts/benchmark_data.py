"""Images/s per core of CPU time of the data paths, stage by stage, on synthetic ImageNet-like JPEGs.

Writes ``--num-images`` textured JPEGs with ImageNet's size mix (most near 500x375, median ~500x375, a tail up to
``--max-side`` px) to a temp dir and times, in this one process and thread (what one DataLoader worker does), each
path over the same files and seeds. Rates are images per second of this process's CPU time (``time.process_time``),
so other load on the machine slows them less than wall-clock rates (they stay noisy on a shared machine).

    decode                      our decode (any mode -> RGB)
    decode+crop+flip            + timm RandomResizedCrop + flip (uint8 PIL)
    +RandAugment                + timm rand-m9-mstd0.5-inc1
    folder (deit, today)        + to tensor, normalise, random erasing: today's CPU path, float32 out
    folder + uint8 workers      the worker side of data.uint8_workers=true (uint8 out + erasing draws)
    folder + device RandAugment the worker side of augment.device=true (reduced-DCT decode, crop, flip, draws)
    folder + device decode      ... with augment.device_decode=true (read the bytes and header, draws; no pixels)
    shards (deit, today)        today's CPU path reading a pack (python -m deit_train.pack, max_side 512) by index
    shards + uint8 workers      ... the uint8 worker side
    shards + device RandAugment ... the device path's worker side
    shards + device decode      ... the worker side of augment.device_decode=true
    device stage (CPU tensors)  what the device does after the transfer (RandAugment kernels, normalise, erasing),
                                timed on CPU tensors in batches of --device-batch (on a GPU it costs GPU time)
    device stage with decode    ... plus decode_jpeg (libjpeg-turbo here, nvjpeg on CUDA), crop-resize and flip
    baseline                    torchvision's plain decode + RandomResizedCrop(224) + PILToTensor

Each row's ratio is against ``folder (deit, today)``; "cores/node" = CPU cores an 8-GPU node needs to feed
``--gpu-rate`` img/s per GPU on that path (the device stage runs on the GPUs, not counted).

    python scripts/benchmark_data.py [--num-images 48] [--rounds 2] [--json out.json] [--markdown out.md]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from torchvision import transforms

from deit_train.data.device_augment import collate_device_images
from deit_train.data.images import EncodedImage, load_rgb
from deit_train.data.recipes import AugmentRecipe
from deit_train.data.stream import seed_globals

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DEIT = dict(name="deit", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, re_prob=0.25)
REFERENCE = "folder (deit, today)"


def image_sizes(count: int, max_side: int, seed: int = 0) -> list[tuple[int, int]]:
    """ImageNet-like (w, h): 4:3 or 3:4, long side log-normal around 500 px (median 500), clipped to
    [200, max_side] -- about 6% of images above 1000 px."""
    rng = np.random.default_rng(seed)
    sizes = []
    for _ in range(count):
        long_side = int(np.clip(500 * np.exp(rng.normal(0, 0.45)), 200, max_side))
        short_side = long_side * 3 // 4
        sizes.append((long_side, short_side) if rng.random() < 0.75 else (short_side, long_side))
    return sizes


def write_jpegs(folder: Path, count: int, max_side: int = 2000, seed: int = 0) -> list[Path]:
    """Smooth colour fields plus noise: compress like photos (quality 90)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(image_sizes(count, max_side, seed)):
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([127 + 100 * np.sin(xx / (20 + 7 * c) + yy / (31 + 5 * c) + phase[c]) for c in range(3)],
                        -1)
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def per_core_rate(items: list, pipeline, rounds: int) -> float:
    """Images per second of CPU time, every image under its own seed (the deterministic stream's way)."""
    for seed, item in enumerate(items[:2]):  # warm-up: lazy imports, caches, readers
        seed_globals(seed, cpu_only=True)
        pipeline(item)
    started = time.process_time()
    for round_ in range(rounds):
        for seed, item in enumerate(items):
            seed_globals(round_ * len(items) + seed, cpu_only=True)
            pipeline(item)
    return rounds * len(items) / (time.process_time() - started)


def write_pack(paths: list[Path], folder: Path, max_side: int) -> tuple[Path, float]:
    """The JPEGs as an ImageNet-layout folder packed by ``deit_train.data.pack`` (one worker); (pack, img/s)."""
    from deit_train.data.pack import pack_folder

    source = folder / "source"
    for split, members in (("train", paths), ("val", paths[:1])):
        (source / split / "c0").mkdir(parents=True)
        for path in members:
            (source / split / "c0" / path.name).symlink_to(path)
    started = time.perf_counter()
    pack_folder(source, folder / "pack", max_side=max_side, quality=90, workers=1)
    return folder / "pack", (len(paths) + 1) / (time.perf_counter() - started)


def shard_pipelines(pack: Path, size: int) -> dict:
    """The worker paths reading the pack's train split by index."""
    from deit_train.data.shards import ShardsDataModule

    rows = {"shards (deit, today)": (AugmentRecipe(**DEIT), False),
            "shards + uint8 workers": (AugmentRecipe(**DEIT), True),
            "shards + device RandAugment (CPU share)": (AugmentRecipe(**DEIT, device=True), True),
            "shards + device decode (CPU share)": (AugmentRecipe(**DEIT, device=True, device_decode=True), True)}
    pipelines = {}
    for name, (recipe, uint8) in rows.items():
        dm = ShardsDataModule(root=str(pack), image_size=size, num_workers=0, recipe=recipe, uint8_workers=uint8)
        dm.setup("fit")
        pipelines[name] = dm.train_set.__getitem__
    return pipelines


def stage_pipelines(size: int) -> dict:
    """Today's deit path cut after each stage (timm's own transforms, in order)."""
    recipe = AugmentRecipe(**DEIT)
    crop, colour, final = recipe._stages(size, MEAN, STD, "bicubic")
    randaugment = [t for t in colour if isinstance(t, RandAugment)]
    cut = {"decode": [], "decode+crop+flip": crop, "+RandAugment": crop + randaugment,
           REFERENCE: crop + colour + final}
    return {name: (lambda tf: lambda p: tf(load_rgb(p)))(transforms.Compose(steps)) for name, steps in cut.items()}


def device_stage_rate(paths: list[Path], size: int, batch: int, rounds: int, decode: bool = False) -> float:
    """The device path's after-transfer work on CPU tensors (``decode``: from the JPEG bytes): img/s per core (one
    thread)."""
    worker = AugmentRecipe(**DEIT, device=True, device_decode=decode).worker_transform(size, MEAN, STD)
    finish = worker.finish(MEAN, STD)
    samples = []
    for seed in range(batch):
        seed_globals(seed, cpu_only=True)
        samples.append(worker(EncodedImage(paths[seed % len(paths)])))
    batch_images = collate_device_images(samples)
    finish(batch_images)  # warm-up
    started = time.process_time()
    for _ in range(rounds):
        finish(batch_images)
    return rounds * batch / (time.process_time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--max-side", type=int, default=2000, help="longest side of the size mix's tail")
    parser.add_argument("--device-batch", type=int, default=64)
    parser.add_argument("--pack-max-side", type=int, default=512, help="pack.max_side of the shards rows")
    parser.add_argument("--no-shards", action="store_true", help="leave the shards rows out")
    parser.add_argument("--gpu-rate", type=float, default=4000.0, help="img/s per GPU to feed (cores/node column)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's share
    size = args.image_size

    pipelines = stage_pipelines(size)
    uint8 = AugmentRecipe(**DEIT).worker_transform(size, MEAN, STD)
    pipelines["folder + uint8 workers"] = lambda p: uint8(load_rgb(p))
    device = AugmentRecipe(**DEIT, device=True).worker_transform(size, MEAN, STD)
    pipelines["folder + device RandAugment (CPU share)"] = lambda p: device(EncodedImage(p))
    decode = AugmentRecipe(**DEIT, device=True, device_decode=True).worker_transform(size, MEAN, STD)
    pipelines["folder + device decode (CPU share)"] = lambda p: decode(EncodedImage(p))
    baseline_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.PILToTensor()])
    pipelines["baseline (torchvision decode+RRC)"] = lambda p: baseline_tf(Image.open(p).convert("RGB"))

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.num_images, args.max_side)
        sizes = sorted(Image.open(p).size[0] * Image.open(p).size[1] for p in paths)
        rates = {name: per_core_rate(paths, fn, args.rounds) for name, fn in pipelines.items()}
        pack_rate = None
        if not args.no_shards:
            pack, pack_rate = write_pack(paths, Path(tmp), args.pack_max_side)
            indices = list(range(len(paths)))
            rates.update({name: per_core_rate(indices, fn, args.rounds)
                          for name, fn in shard_pipelines(pack, size).items()})
        rates["device stage (CPU tensors)"] = device_stage_rate(paths, size, args.device_batch, max(1, args.rounds))
        rates["device stage with decode (CPU tensors)"] = device_stage_rate(paths, size, args.device_batch,
                                                                            max(1, args.rounds), decode=True)

    reference = rates[REFERENCE]
    node_rate = 8 * args.gpu_rate
    rows = [{"path": name, "img_per_s_per_core": rate, "ratio": rate / reference,
             "cores_per_8_gpu_node": node_rate / rate} for name, rate in rates.items()]
    median_pixels = sizes[len(sizes) // 2]
    header = (f"{args.num_images} JPEGs (median {median_pixels / 1e3:.0f} kpixel, largest side up to "
              f"{args.max_side}) -> {size}px, {args.rounds} rounds, img/s per core of CPU time; cores/node: an "
              f"8-GPU node at {args.gpu_rate:.0f} img/s per GPU")
    lines = [f"| path | img/s per core | vs {REFERENCE} | cores/node |", "|---|---:|---:|---:|"]
    lines += [f"| {r['path']} | {r['img_per_s_per_core']:.1f} | {r['ratio']:.2f}x | {r['cores_per_8_gpu_node']:.0f} |"
              for r in rows]
    if pack_rate is not None:
        header += f"; pack rate {pack_rate:.1f} img/s (one worker, wall clock, max_side {args.pack_max_side})"
    print(header)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "rows": rows, "pack_img_per_s": pack_rate}, indent=2))
    if args.markdown:
        args.markdown.write_text(header + "\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
