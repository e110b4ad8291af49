"""The paper's Table 5 rows for the distilled DeiTs (DeiT-Ti⚗, DeiT-S⚗, DeiT-B⚗ at 224 px) from the official
files, measured by this framework's eval, beside the numbers the official README publishes for the same files.

    python scripts/eval_paper_table5.py --imagenet /path/to/imagenet --weights /path/to/official_pth_files

``--imagenet``: ImageNet in the folder layout (``val/<wnid>/*.JPEG``, and ``train/<wnid>/`` for the class list;
with only ``val/`` add ``--data data.train_split=val``). ``--weights``: a folder with the official files (names as
published, downloaded by you from the official README's model zoo; nothing is downloaded here). Each row runs

    python -m deit_train.eval ckpt=<file> model=<size> data=imagefolder data.root=<imagenet> split=val out=<out>/<size>.json

and the table printed at the end compares top-1/top-5/cross-entropy with the official ``main.py --eval`` output
(README_deit.md: Acc@1, Acc@5, loss). ``--dry-run`` prints the commands only.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

URL = "https://dl.fbaipublicfiles.com/deit/"
# (row, model config, official file, README's main.py --eval: Acc@1, Acc@5, loss; the paper's Table 5 rounds Acc@1)
ROWS = [
    ("DeiT-Ti⚗", "deit_tiny", "deit_tiny_distilled_patch16_224-b40b3cf7.pth", 74.476, 91.920, 1.021),
    ("DeiT-S⚗", "deit_small", "deit_small_distilled_patch16_224-649709d9.pth", 81.164, 95.376, 0.752),
    ("DeiT-B⚗", "deit_base", "deit_base_distilled_patch16_224-df68dfff.pth", 83.372, 96.482, 0.685),
]


def commands(imagenet: str, weights: Path, out: Path, extra: list[str]) -> list[list[str]]:
    return [[sys.executable, "-m", "deit_train.eval", f"ckpt={weights / file}", f"model={size}", "data=imagefolder",
             f"data.root={imagenet}", "split=val", f"out={out / size}.json", *extra]
            for _, size, file, *_ in ROWS]


def table(out: Path) -> str:
    """Markdown: ours beside the README's, per row whose metrics file exists."""
    lines = ["| model | top-1 (ours) | top-1 (README) | Δ | top-5 (ours) | top-5 (README) | CE (ours) | loss (README) "
             "| images/s |", "|---|---|---|---|---|---|---|---|---|"]
    for row, size, _, top1, top5, loss in ROWS:
        path = out / f"{size}.json"
        if not path.is_file():
            continue
        m = json.loads(path.read_text())
        lines.append(f"| {row} | {100 * m['val/top1']:.3f} | {top1:.3f} | {100 * m['val/top1'] - top1:+.3f} | "
                     f"{100 * m['val/top5']:.3f} | {top5:.3f} | {m['val/ce']:.3f} | {loss:.3f} | "
                     f"{m['val/throughput']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--imagenet", required=True, help="ImageNet root (train/ and val/ class folders)")
    parser.add_argument("--weights", required=True, type=Path, help="folder with the official DeiT .pth files")
    parser.add_argument("--out", default=Path("table5"), type=Path, help="where the metrics JSON files go")
    parser.add_argument("--data", nargs="*", default=[], help="more eval options, e.g. data.num_workers=16 device=cuda")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    missing = [args.weights / file for _, _, file, *_ in ROWS if not (args.weights / file).is_file()]
    if missing and not args.dry_run:
        print(f"error: {missing[0]} does not exist: download it from {URL}{missing[0].name} (official README, "
              "Model Zoo) into --weights", file=sys.stderr)
        return 2
    for command in commands(args.imagenet, args.weights, args.out, args.data):
        print("$", shlex.join(["python", *command[1:]]), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)
    if not args.dry_run:
        print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
