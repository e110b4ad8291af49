"""Throughput and memory of DeiT students: ``python -m deit_train.benchmark models=[deit_tiny,deit_small]``.

For every model config (``configs/model/<name>.yaml``), batch size, precision (fp32, bf16, fp16 where the device
runs it), attention implementation (``sdpa``: timm's fused ``scaled_dot_product_attention``; ``eager``: timm's
explicit softmax(QK^T)V) and mode (``inference``: forward under ``inference_mode``; ``train``: forward, both heads'
cross-entropy, backward and an AdamW step), measures images per second and peak accelerator memory. Writes
``<out>/benchmark.json`` and ``<out>/benchmark.md`` (with the SDPA-over-eager speed-up per row) and prints the table.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.nn import functional as F

from deit_train.run.cli import run_main
from deit_train.run.config import CONFIG_DIR
from deit_train.errors import ConfigError
from deit_train.models.deit import forward_heads

USAGE = """usage: python -m deit_train.benchmark [models=[deit_tiny,deit_small]] [batch_sizes=[64]]
  [precisions=[fp32,bf16,fp16]] [attention=[sdpa,eager]] [modes=[inference,train]] [image_size=<model's>]
  [distilled=true] [num_classes=1000] [model_overrides.hidden_size=32 ...] [steps=10]
  [warmup=3] [device=auto] [out=benchmark]"""
DEFAULTS = {"models": ["deit_tiny", "deit_small"], "batch_sizes": [64], "precisions": ["fp32", "bf16", "fp16"],
            "attention": ["sdpa", "eager"], "modes": ["inference", "train"], "image_size": None, "distilled": True,
            "num_classes": 1000, "model_overrides": {}, "steps": 10, "warmup": 3, "device": "auto", "out": "benchmark"}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_config(name: str, image_size: int | None, distilled: bool, num_classes: int,
                 overrides: dict | None = None) -> dict:
    """``configs/model/<name>.yaml`` with the data-dependent fields filled in and ``overrides`` applied."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "model").glob("deit_*.yaml"))
        raise ConfigError(f"models: no model config '{name}' ({path}): pick from {known}")
    cfg = OmegaConf.load(path)
    if not str(cfg.get("_target_", "")).endswith("create_deit"):
        raise ConfigError(f"models: '{name}' is not a DeiT config (create_deit); the attention switch needs a ViT")
    cfg.num_classes, cfg.distilled, cfg.drop_path_rate = num_classes, distilled, 0.0
    if image_size:
        cfg.image_size = image_size
    for key, value in (overrides or {}).items():
        if key not in cfg or key == "_target_":
            raise ConfigError(f"model_overrides.{key} is not a field of the {name} model config")
        cfg[key] = value
    return OmegaConf.to_container(cfg, resolve=True)


def set_attention(model: nn.Module, implementation: str) -> None:
    if implementation not in ("sdpa", "eager"):
        raise ConfigError(f"attention={implementation} is unknown: use sdpa or eager")
    for block in model.blocks:
        block.attn.fused_attn = implementation == "sdpa"


def precision_supported(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device``; None when it can."""
    if precision not in DTYPES:
        raise ConfigError(f"precisions: {precision} is unknown: use fp32, bf16 or fp16")
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return "this GPU has no bf16"
        return None
    if precision == "fp16":
        return f"fp16 autocast is for accelerators; {device.type} runs fp32/bf16"
    return None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def measure(model: nn.Module, mode: str, batch_size: int, precision: str, device: torch.device,
            steps: int, warmup: int) -> dict:
    """Images per second from the median of ``steps`` timed iterations after ``warmup`` untimed ones."""
    image_size = model.patch_embed.img_size
    channels = model.patch_embed.proj.in_channels
    images = torch.randn(batch_size, channels, *image_size, device=device)
    labels = torch.randint(0, max(model.num_classes, 1), (batch_size,), device=device)
    dtype = DTYPES[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
    if mode == "inference":
        model.eval()

        def step() -> None:
            with torch.inference_mode(), autocast:
                forward_heads(model, images)
    elif mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                cls, dist = forward_heads(model, images)
                loss = F.cross_entropy(cls, labels) if dist is None else \
                    (F.cross_entropy(cls, labels) + F.cross_entropy(dist, labels)) / 2
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
    else:
        raise ConfigError(f"modes: {mode} is unknown: use inference or train")
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    durations = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        _synchronize(device)
        durations.append(time.perf_counter() - started)
    median = statistics.median(durations)  # robust to the odd step another process slows down
    return {"images_per_s": batch_size / median, "ms_per_step": 1000 * median,
            "peak_memory_mb": _peak_memory_mb(device)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but torch sees no CUDA device: use device=cpu or device=auto")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_benchmark(models: Sequence[str], batch_sizes: Sequence[int], precisions: Sequence[str],
                  attention: Sequence[str], modes: Sequence[str], image_size: int | None = None,
                  distilled: bool = True, num_classes: int = 1000, model_overrides: dict | None = None,
                  steps: int = 10, warmup: int = 3, device: str = "auto") -> dict:
    """Every combination, one row each; rows that cannot run say why in ``skipped``."""
    target = resolve_device(device)
    rows = []
    for name in models:
        cfg = model_config(name, image_size, distilled, num_classes, model_overrides)
        torch.manual_seed(0)
        for mode in modes:
            for precision in precisions:
                skip = precision_supported(precision, target)
                for implementation in attention:
                    for batch_size in batch_sizes:
                        row = {"model": name, "image_size": cfg["image_size"], "batch_size": int(batch_size),
                               "precision": precision, "attention": implementation, "mode": mode}
                        if skip:
                            rows.append({**row, "skipped": skip})
                            continue
                        model = instantiate(cfg).to(target)  # fresh weights and optimizer state per row
                        row["params_m"] = sum(p.numel() for p in model.parameters()) / 1e6
                        set_attention(model, implementation)
                        try:
                            row.update(measure(model, mode, int(batch_size), precision, target, steps, warmup))
                        except torch.OutOfMemoryError:
                            row["skipped"] = "out of memory"
                        del model
                        if target.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(row)
    add_speedups(rows)
    return {"device": device_name(target), "torch": torch.__version__, "timm": timm.__version__,
            "steps": steps, "warmup": warmup, "results": rows}


def add_speedups(rows: list[dict]) -> None:
    """``sdpa_speedup`` = SDPA img/s / eager img/s of the same model, batch, precision and mode."""
    def key(row: dict) -> tuple:
        return row["model"], row["batch_size"], row["precision"], row["mode"]

    eager = {key(r): r["images_per_s"] for r in rows if r["attention"] == "eager" and "images_per_s" in r}
    for row in rows:
        if row["attention"] == "sdpa" and "images_per_s" in row and key(row) in eager:
            row["sdpa_speedup"] = row["images_per_s"] / eager[key(row)]


def markdown_table(report: dict) -> str:
    lines = [f"Device: {report['device']} · torch {report['torch']} · timm {report['timm']} · "
             f"median of {report['steps']} timed steps after {report['warmup']} warm-up", "",
             "| model | params (M) | image | batch | precision | attention | mode | img/s | ms/step | peak MB | SDPA speed-up |",
             "|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | | {r['image_size']} | {r['batch_size']} | {r['precision']} | "
                         f"{r['attention']} | {r['mode']} | skipped: {r['skipped']} | | | |")
            continue
        memory = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "n/a"
        speedup = f"{r['sdpa_speedup']:.2f}x" if "sdpa_speedup" in r else ""
        lines.append(f"| {r['model']} | {r['params_m']:.2f} | {r['image_size']} | {r['batch_size']} | {r['precision']} | "
                     f"{r['attention']} | {r['mode']} | {r['images_per_s']:.1f} | {r['ms_per_step']:.1f} | {memory} | "
                     f"{speedup} |")
    return "\n".join(lines) + "\n"


def main(cfg: DictConfig) -> None:
    lists = {k: list(cfg[k]) if not isinstance(cfg[k], (str, int)) else [cfg[k]]
             for k in ("models", "batch_sizes", "precisions", "attention", "modes")}
    report = run_benchmark(**lists, image_size=cfg.image_size, distilled=bool(cfg.distilled),
                           num_classes=int(cfg.num_classes), model_overrides=OmegaConf.to_container(cfg.model_overrides),
                           steps=int(cfg.steps), warmup=int(cfg.warmup), device=cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (out / "benchmark.md").write_text(table)
    print(table)
    print(f"written: {out / 'benchmark.json'}, {out / 'benchmark.md'}")


def cli() -> None:
    """The command line: ``deit-benchmark`` or ``python -m deit_train.benchmark``."""
    run_main(main, DEFAULTS, USAGE)


if __name__ == "__main__":
    cli()
