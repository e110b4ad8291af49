"""Classify images with a trained checkpoint: ``python -m deit_train.predict ckpt=... images=[a.png,b.png]``.

``images`` is a list of files or a folder (searched recursively). Prints the top-k classes with probabilities of
the prediction (the mean of both heads' logits for a distilled student) and of each head, and writes
``<out>/predictions.json``. ``attention=true`` also writes ``<out>/<image>_attention.png`` (``<image>``: the path
relative to the images' common folder, so equal file names in different folders stay apart): the attention rollout
(Abnar & Zuidema, 2020) from the class token over the patches, on top of the image the model saw.
``image_size=N`` runs at another resolution than training (position embeddings interpolated).
Images are decoded as training decodes them (``load_rgb``); an unreadable file stops the run with one line naming it,
or with ``skip_bad=true`` is skipped and listed in ``predictions.json`` as ``{"image": ..., "skipped": reason}``.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from deit_train.run.cli import run_main
from deit_train.data.images import CorruptImageError, load_rgb
from deit_train.errors import ConfigError
from deit_train.models.deit import average_heads, forward_heads
from deit_train.run.trained_model import TrainedModel, load_trained_model

USAGE = """usage: python -m deit_train.predict ckpt=<run_dir>/checkpoints/<name>.ckpt images=[a.png,b.png]|<folder>
  [top_k=5] [image_size=<training size>] [attention=false] [out=predictions] [batch_size=32] [device=cpu]
  [skip_bad=false] [weights=student|ema]"""
DEFAULTS = {"ckpt": None, "images": None, "top_k": 5, "image_size": None, "attention": False,
            "out": "predictions", "batch_size": 32, "device": "cpu", "skip_bad": False, "weights": "student"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def find_images(images: str | Sequence[str]) -> list[Path]:
    """Files as given (in order), or the image files under a folder (sorted)."""
    entries = [images] if isinstance(images, (str, Path)) else list(images)
    found: list[Path] = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise ConfigError(f"images: {path} is neither an image file nor a folder")
    if not found:
        raise ConfigError(f"images={images} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


def relative_names(paths: Sequence[Path]) -> list[Path]:
    """Each path relative to the folder all of them are in: an output name that two equal file names in
    different folders do not share."""
    parents = [str(p.resolve().parent) for p in paths]
    root = Path(os.path.commonpath(parents))
    return [p.resolve().relative_to(root) for p in paths]


def read_images(paths: Sequence[Path], transform, skip_bad: bool) -> tuple[list[Path], list[Tensor], list[dict]]:
    """The readable paths with their model inputs, and ``{"image", "skipped"}`` for each unreadable file
    (only with ``skip_bad``; otherwise the first one stops with one line naming it)."""
    kept, pixels, skipped = [], [], []
    for path in paths:
        try:
            image = load_rgb(path)
        except CorruptImageError as exc:
            if not skip_bad:
                raise ConfigError(f"cannot decode image {exc.source}: delete or replace the file, or pass "
                                  "skip_bad=true to skip unreadable files") from exc
            cause = exc.__cause__
            skipped.append({"image": str(path), "skipped": f"{type(cause).__name__}: {cause}"})
            continue
        kept.append(path)
        pixels.append(transform(image))
    return kept, pixels, skipped


# ---- attention rollout ------------------------------------------------------------------------------------------
@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect each block's attention probabilities (batch, heads, tokens, tokens) during forward passes.

    timm's fused (SDPA) attention never materialises the matrix, so the blocks run timm's explicit path for the
    duration; the probabilities are the input of ``attn_drop`` (identity in eval mode).
    """
    maps: list[Tensor] = []
    attentions = [block.attn for block in model.blocks]
    fused = [attn.fused_attn for attn in attentions]
    handles = [attn.attn_drop.register_forward_hook(lambda _m, _i, output: maps.append(output.detach()))
               for attn in attentions]
    for attn in attentions:
        attn.fused_attn = False
    try:
        yield maps
    finally:
        for attn, was_fused, handle in zip(attentions, fused, handles):
            attn.fused_attn = was_fused
            handle.remove()


def attention_rollout(maps: Sequence[Tensor], num_prefix_tokens: int) -> Tensor:
    """Class-token rollout over the patch tokens, (batch, patches).

    Per layer: heads averaged, the residual connection added as identity, rows renormalised; the layers'
    matrices multiplied from the first to the last; the class token's row, prefix tokens dropped.
    """
    rollout = None
    for attn in maps:
        mixed = attn.float().mean(dim=1)
        mixed = mixed + torch.eye(mixed.shape[-1], device=mixed.device)
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout[:, 0, num_prefix_tokens:]


def rollout_image(weights: Tensor, grid: tuple[int, int], pixels: Tensor, mean, std) -> Image.Image:
    """The rollout (patches) as a heat map over the (de-normalised) model input, as an RGB image."""
    from matplotlib import colormaps

    heat = weights.reshape(1, 1, *grid)
    heat = F.interpolate(heat, size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)
    colour = colormaps["jet"](heat.numpy())[..., :3]
    image = pixels * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    image = image[:3].clamp(0, 1).permute(1, 2, 0).numpy()
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    blended = 0.5 * image + 0.5 * colour
    return Image.fromarray((blended * 255).round().astype(np.uint8))


# ---- prediction ---------------------------------------------------------------------------------------------------
def top_k(logits: Tensor, class_names: Sequence[str], k: int) -> list[list[dict]]:
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[{"label": class_names[i], "index": int(i), "probability": float(p)} for p, i in zip(row_p, row_i)]
            for row_p, row_i in zip(values.tolist(), indices.tolist())]


def predict(ckpt: str | Path, images: str | Sequence[str], top_k_count: int = 5, image_size: int | None = None,
            attention: bool = False, out: str | Path | None = None, batch_size: int = 32,
            device: str = "cpu", skip_bad: bool = False, weights: str = "student") -> list[dict]:
    """One record per image: ``prediction`` (and ``cls_head``/``dist_head`` for distilled students) as top-k
    lists, and the attention PNG's path when ``attention``; with ``skip_bad``, ``{"image", "skipped"}`` for each
    unreadable file. ``weights="ema"``: the EMA the run kept instead of the student."""
    trained: TrainedModel = load_trained_model(ckpt, image_size=image_size, weights=weights)
    if trained.task != "classification":
        raise ConfigError(f"ckpt={ckpt} is a {trained.task} checkpoint without a classifier: fine-tune it first "
                          f"(model.init_from={ckpt})")
    model = trained.model.to(device)
    if attention and not hasattr(model, "blocks"):
        raise ConfigError("attention=true needs a ViT/DeiT student (attention blocks); this one is a "
                          f"{type(model).__name__}")
    pre = trained.preprocessing
    transform = pre.transform()
    paths = find_images(images)
    names = dict(zip(paths, relative_names(paths)))
    out = Path(out) if out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    for start in range(0, len(paths), batch_size):
        chunk, inputs, skipped = read_images(paths[start:start + batch_size], transform, skip_bad)
        records += skipped
        if not chunk:
            continue
        pixels = torch.stack(inputs)
        with torch.no_grad():
            if attention:
                with capture_attention(model) as maps:
                    cls, dist = forward_heads(model, pixels.to(device))
                rollout = attention_rollout(maps, model.num_prefix_tokens).cpu()
            else:
                cls, dist = forward_heads(model, pixels.to(device))
        heads = {"prediction": average_heads(cls, dist)}
        if dist is not None:
            heads.update(cls_head=cls, dist_head=dist)
        ranked = {name: top_k(logits.cpu(), trained.class_names, top_k_count) for name, logits in heads.items()}
        for i, path in enumerate(chunk):
            record = {"image": str(path), **{name: rows[i] for name, rows in ranked.items()}}
            if attention:
                png = (out / names[path].parent if out else path.parent) / f"{path.stem}_attention.png"
                png.parent.mkdir(parents=True, exist_ok=True)
                grid = tuple(model.patch_embed.grid_size)
                rollout_image(rollout[i], grid, pixels[i], pre.mean, pre.std).save(png)
                record["attention"] = str(png)
            records.append(record)
    order = {str(path): i for i, path in enumerate(paths)}
    records.sort(key=lambda record: order[record["image"]])  # skipped files where they were in the input
    if out is not None:
        (out / "predictions.json").write_text(json.dumps(records, indent=2))
    return records


def format_records(records: Sequence[dict]) -> str:
    lines = []
    for record in records:
        lines.append(record["image"])
        if "skipped" in record:
            lines.append(f"  skipped    {record['skipped']}")
        for head in ("prediction", "cls_head", "dist_head"):
            if head in record:
                ranked = ", ".join(f"{r['label']} {r['probability']:.3f}" for r in record[head])
                lines.append(f"  {head:<10} {ranked}")
        if "attention" in record:
            lines.append(f"  attention  {record['attention']}")
    return "\n".join(lines)


def main(cfg: DictConfig) -> None:
    if not cfg.ckpt or not cfg.images:
        raise ConfigError(f"ckpt and images are required\n{USAGE}")
    images = cfg.images if isinstance(cfg.images, str) else list(cfg.images)
    records = predict(cfg.ckpt, images, int(cfg.top_k), cfg.image_size, bool(cfg.attention), cfg.out,
                      int(cfg.batch_size), cfg.device, bool(cfg.skip_bad), cfg.weights)
    print(format_records(records))


def cli() -> None:
    """The command line: ``deit-predict`` or ``python -m deit_train.predict``."""
    run_main(main, DEFAULTS, USAGE)


if __name__ == "__main__":
    cli()
