"""Per-worker images/s of the training recipes on JPEG files, against torchvision's plain decode + RandomResizedCrop.

Writes ``--num-images`` ImageNet-sized JPEGs (textured, 500x375 like the median ImageNet photo) to a temp dir, then
times, in this one process and thread (what one DataLoader worker does), each pipeline over the same files:

    baseline       PIL decode + torchvision RandomResizedCrop(224) + PILToTensor
    deit           our decode (any mode -> RGB) + the deit recipe (RRC, flip, RandAugment, normalise, erasing)
    three_augment  our decode + DeiT III's 3-Augment
    eval           our decode + the eval transform (resize 256, center crop 224)

    python scripts/benchmark_data.py [--num-images 64] [--rounds 3] [--image-size 224]
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
from torchvision import transforms

from deit_train.data.images import load_rgb
from deit_train.data.recipes import AugmentRecipe
from deit_train.data.transforms import eval_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

RECIPES = {
    "deit": AugmentRecipe(name="deit", auto_augment="rand-m9-mstd0.5-inc1", color_jitter=0.3, re_prob=0.25),
    "three_augment": AugmentRecipe(name="three_augment", train_crop="src", auto_augment="3a", color_jitter=0.3),
}


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """Smooth colour fields plus noise: compress like photos (~50-100 KB at quality 90)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500]
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = np.stack([127 + 100 * np.sin(xx / (20 + 7 * c) + yy / (31 + 5 * c) + phase[c]) for c in range(3)], -1)
        image = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(image).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(paths: list[Path], pipeline, rounds: int) -> float:
    for path in paths[:4]:  # warm-up: lazy imports, caches
        pipeline(path)
    started = time.perf_counter()
    for _ in range(rounds):
        for path in paths:
            pipeline(path)
    return rounds * len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # one DataLoader worker's share
    size = args.image_size

    baseline_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.PILToTensor()])
    pipelines = {"baseline": lambda p: baseline_tf(Image.open(p).convert("RGB"))}
    for name, recipe in RECIPES.items():
        pipelines[name] = (lambda tf: lambda p: tf(load_rgb(p)))(recipe.train_transform(size, MEAN, STD))
    pipelines["eval"] = (lambda tf: lambda p: tf(load_rgb(p)))(eval_transform(size, MEAN, STD))

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.num_images)
        rates = {name: images_per_second(paths, fn, args.rounds) for name, fn in pipelines.items()}

    print(f"{args.num_images} JPEGs 500x375 -> {size}px, {args.rounds} rounds, 1 thread (one worker)")
    print(f"{'pipeline':<14} {'images/s':>9} {'vs baseline':>12}")
    for name, rate in rates.items():
        print(f"{name:<14} {rate:9.1f} {rate / rates['baseline']:11.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"images_per_s": rates,
                                         "ratio_to_baseline": {k: v / rates["baseline"] for k, v in rates.items()}},
                                        indent=2))


if __name__ == "__main__":
    main()
