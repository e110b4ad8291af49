"""Publish a trained checkpoint for HF transformers or timm: ``python -m deit_train.export ckpt=... format=hf|timm out=...``.

- ``format=hf``: a ``save_pretrained`` directory (config.json with ``id2label``/``label2id``, model.safetensors,
  preprocessor_config.json of the eval preprocessing). Distilled students become
  ``DeiTForImageClassificationWithTeacher`` (``hf_class=DeiTForImageClassification`` keeps the class head only);
  students without a distillation token become ``ViTForImageClassification``: transformers' DeiT always puts a
  distillation token into the sequence, so only ViT computes what such a student computes (the hub's
  ``facebook/deit-*-patch16-224`` are ViT checkpoints for the same reason). SimMIM checkpoints become
  ``DeiTForMaskedImageModeling`` (distilled encoder) / ``ViTForMaskedImageModeling``.
- ``format=timm``: timm's hub layout (config.json with ``architecture``, ``model_args``, ``pretrained_cfg``, and
  model.safetensors), loadable with ``timm.create_model("local-dir:<out>", pretrained=True)`` or
  ``timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=..., **pretrained_cfg),
  **model_args)``.

Each export is loaded back and compared with the checkpoint's own outputs before the command reports success.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from deit_train.run.cli import run_main
from deit_train.errors import ConfigError
from deit_train.models.deit import average_heads, forward_heads, is_distilled
from deit_train.models.hf_convert import HF_CLASSES, timm_to_hf
from deit_train.run.trained_model import TrainedModel, load_trained_model

USAGE = """usage: python -m deit_train.export ckpt=<run_dir>/checkpoints/<name>.ckpt format=hf|timm out=<dir>
  [hf_class=auto|DeiTForImageClassificationWithTeacher|DeiTForImageClassification|ViTForImageClassification]
  [tolerance=1e-4] [license=<SPDX id of the weights, format=timm>] [weights=student|ema]"""
DEFAULTS = {"ckpt": None, "format": "hf", "out": None, "hf_class": "auto", "tolerance": 1e-4, "license": None,
            "weights": "student"}
# pretrained_cfg tag of weights trained here (timm's own say where theirs come from, e.g. fb_in1k)
TIMM_TAG = "deit_train"
HF_INSTALL = 'format=hf needs HF transformers: pip install -e ".[hf]" (or pip install "transformers>=4.44")'
# timm's VisionTransformer builds its norms from this name with eps=1e-6 (the DeiT value)
_TIMM_NORM = "layernorm"
_PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}


# ---- HF transformers ----------------------------------------------------------------------------------
def hf_class_for(trained: TrainedModel, requested: str = "auto") -> str:
    encoder = trained.model.encoder if trained.task == "simmim" else trained.model
    distilled = is_distilled(encoder)
    if trained.task == "simmim":
        choice = "DeiTForMaskedImageModeling" if distilled else "ViTForMaskedImageModeling"
        if requested not in ("auto", choice):
            raise ConfigError(f"hf_class={requested} does not fit a SimMIM checkpoint: use hf_class=auto ({choice})")
        return choice
    if requested == "auto":
        return "DeiTForImageClassificationWithTeacher" if distilled else "ViTForImageClassification"
    if requested not in HF_CLASSES or "MaskedImage" in requested:
        raise ConfigError(f"hf_class={requested} is not a classification class: pick one of "
                          "DeiTForImageClassificationWithTeacher, DeiTForImageClassification, ViTForImageClassification")
    if requested.startswith("DeiT") and not distilled:
        raise ConfigError(f"hf_class={requested} adds a distillation token this student never had (it would change "
                          "every output): export it as ViTForImageClassification (hf_class=auto)")
    if requested == "ViTForImageClassification" and distilled:
        raise ConfigError("hf_class=ViTForImageClassification has no distillation token: a distilled student "
                          "needs DeiTForImageClassificationWithTeacher or DeiTForImageClassification")
    return requested


def _check_plain_vit(encoder: nn.Module) -> None:
    """transformers' DeiT/ViT are the plain pre-norm ViT: refuse what they cannot express instead of exporting
    something that computes other numbers."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(encoder, VisionTransformer):
        raise ConfigError(f"format=hf needs a DeiT student (timm VisionTransformer), this checkpoint holds a "
                          f"{type(encoder).__name__}: use format=timm")
    block = encoder.blocks[0]
    unsupported = {
        "global_pool != token": encoder.global_pool != "token",
        "registers": getattr(encoder, "num_reg_tokens", 0) > 0,
        "qk_norm / layer scale": not all(isinstance(m, nn.Identity) for m in (block.attn.q_norm, block.ls1)),
        "non-GELU activation": not isinstance(block.mlp.act, nn.GELU) or block.mlp.act.approximate != "none",
        "pre-norm / fc-norm": not isinstance(encoder.norm_pre, nn.Identity) or not isinstance(encoder.fc_norm, nn.Identity),
    }
    found = [name for name, bad in unsupported.items() if bad]
    if found:
        raise ConfigError(f"format=hf cannot express this ViT ({', '.join(found)}): use format=timm")


def hf_config(trained: TrainedModel, hf_class: str):
    from transformers import DeiTConfig, ViTConfig

    encoder = trained.model.encoder if trained.task == "simmim" else trained.model
    _check_plain_vit(encoder)
    block = encoder.blocks[0]
    kwargs = dict(
        hidden_size=encoder.embed_dim, num_hidden_layers=len(encoder.blocks),
        num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
        hidden_act="gelu", layer_norm_eps=block.norm1.eps, image_size=encoder.patch_embed.img_size[0],
        patch_size=encoder.patch_embed.patch_size[0], num_channels=encoder.patch_embed.proj.in_channels,
        qkv_bias=block.attn.qkv.bias is not None, encoder_stride=encoder.patch_embed.patch_size[0],
        architectures=[hf_class],
    )
    if trained.task != "simmim":
        names = trained.class_names or [str(i) for i in range(encoder.num_classes)]
        kwargs["id2label"] = {i: name for i, name in enumerate(names)}
        kwargs["label2id"] = {name: i for i, name in enumerate(names)}
    return (DeiTConfig if hf_class.startswith("DeiT") else ViTConfig)(**kwargs)


def hf_image_processor(trained: TrainedModel):
    """The eval transform as a DeiTImageProcessor: short side to ``image_size / crop_pct``, center crop, normalise."""
    from transformers import DeiTImageProcessor

    pre = trained.preprocessing
    return DeiTImageProcessor(
        do_resize=True, size={"shortest_edge": pre.resize_size}, resample=_PIL_RESAMPLE.get(pre.interpolation, 3),
        do_center_crop=True, crop_size={"height": pre.image_size, "width": pre.image_size},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(pre.mean), image_std=list(pre.std),
        do_convert_rgb=True,  # grey / RGBA / palette images become RGB, as load_rgb does in training
    )


def _hf_state_style(hf_model: nn.Module) -> str:
    """transformers 5 renames the hub's per-layer keys in memory; 4 keeps them."""
    return "v5" if any(".layers." in k for k in hf_model.state_dict()) else "hub"


def ours_outputs(trained: TrainedModel, pixels: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    """The checkpoint's own outputs under the names transformers uses."""
    with torch.no_grad():
        if trained.task == "simmim":
            return {"reconstruction": trained.model(pixels, mask).reconstruction}
        cls, dist = forward_heads(trained.model, pixels)
    if dist is None:
        return {"logits": cls}
    return {"logits": average_heads(cls, dist), "cls_logits": cls, "distillation_logits": dist}


def hf_outputs(hf_model: nn.Module, hf_class: str, pixels: Tensor, mask: Tensor | None = None) -> dict[str, Tensor]:
    with torch.no_grad():
        if "MaskedImage" in hf_class:
            return {"reconstruction": hf_model(pixel_values=pixels, bool_masked_pos=mask).reconstruction}
        out = hf_model(pixel_values=pixels)
    names = ("logits", "cls_logits", "distillation_logits") if hf_class.endswith("WithTeacher") else ("logits",)
    return {name: getattr(out, name) for name in names}


def _probe(trained: TrainedModel, batch: int = 2) -> tuple[Tensor, Tensor | None]:
    pre = trained.preprocessing
    encoder = trained.model.encoder if trained.task == "simmim" else trained.model
    channels = getattr(getattr(encoder, "patch_embed", None), "proj", None)
    channels = channels.in_channels if channels is not None else 3
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, channels, pre.image_size, pre.image_size, generator=generator)
    mask = None
    if trained.task == "simmim":
        mask = torch.rand(batch, encoder.patch_embed.num_patches, generator=generator) < 0.5
    return pixels, mask


def compare(ours: dict[str, Tensor], theirs: dict[str, Tensor], what: str, tolerance: float) -> float:
    """Largest absolute difference over the outputs both have; a ConfigError when above ``tolerance``."""
    worst = 0.0
    for name, value in ours.items():
        if name in theirs:
            worst = max(worst, (value - theirs[name]).abs().max().item())
    if worst > tolerance:
        raise ConfigError(f"{what} differs from the checkpoint by {worst:.2e} (> tolerance={tolerance}): not exported")
    return worst


def export_hf(trained: TrainedModel, out: Path, hf_class: str = "auto", tolerance: float = 1e-4) -> dict:
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(HF_INSTALL) from exc
    hf_class = hf_class_for(trained, hf_class)
    config = hf_config(trained, hf_class)
    hf_model = getattr(transformers, hf_class)(config).eval()
    state = trained.model.state_dict()
    head_map = None
    if trained.task == "simmim":  # the encoder's keys are the backbone's; a classifier it may carry is unused
        state = {k.removeprefix("encoder."): v for k, v in state.items()
                 if not k.startswith(("encoder.head.", "encoder.head_dist."))}
        head_map = {"decoder.0": "decoder.0"}
    elif hf_class == "DeiTForImageClassification":  # the class head only; the distillation head stays behind
        state = {k: v for k, v in state.items() if not k.startswith("head_dist.")}
    converted = timm_to_hf(state, hf_class, _hf_state_style(hf_model), head_map)
    missing, unexpected = hf_model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ConfigError(f"{hf_class} does not take these weights: missing {missing[:8]}, unexpected {unexpected[:8]}")
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out), safe_serialization=True)
    hf_image_processor(trained).save_pretrained(str(out))
    # what the user will run: a fresh load from the directory, compared with our model on the same pixels
    reloaded = getattr(transformers, hf_class).from_pretrained(str(out)).eval()
    pixels, mask = _probe(trained)
    ours = ours_outputs(trained, pixels, mask)
    if hf_class == "DeiTForImageClassification":
        ours = {"logits": ours["cls_logits"]}
    difference = compare(ours, hf_outputs(reloaded, hf_class, pixels, mask), f"{hf_class} from {out}", tolerance)
    return {"format": "hf", "out": str(out), "hf_class": hf_class, "max_abs_difference": difference,
            "load": f"transformers.{hf_class}.from_pretrained({str(out)!r})"}


# ---- timm -------------------------------------------------------------------------------------------------
def timm_model_args(model: nn.Module) -> dict:
    """The model's constructor arguments as JSON: the norm layer by name (eps must be timm's 1e-6)."""
    args = {k: v for k, v in getattr(model, "_model_args", {}).items() if not k.endswith("drop_path_rate")}
    norm = args.pop("norm_layer", None)
    if norm is not None:
        eps = getattr(model.norm, "eps", None) if hasattr(model, "norm") else None
        if eps is not None and abs(eps - 1e-6) > 1e-12:
            raise ConfigError(f"format=timm: timm's VisionTransformer builds LayerNorms with eps=1e-6, this model "
                              f"uses model.layer_norm_eps={eps}: use format=hf (layer_norm_eps is a DeiTConfig field)")
        args["norm_layer"] = _TIMM_NORM
    return args


def canonical_timm_name(model: nn.Module, args: dict) -> str:
    """``deit_small_distilled_patch16_224`` when the dimensions are a published DeiT's, else the build name."""
    import timm

    sizes = {(192, 3): "tiny", (384, 6): "small", (768, 12): "base"}
    size = sizes.get((args.get("embed_dim"), args.get("num_heads")))
    image = args.get("img_size")
    image = image[0] if isinstance(image, (list, tuple)) else image
    if size and args.get("depth") == 12 and args.get("patch_size") == 16 and args.get("mlp_ratio", 4.0) == 4.0:
        name = f"deit_{size}{'_distilled' if is_distilled(model) else ''}_patch16_{image}"
        if name in timm.list_models("deit_*"):
            return name
    return model.pretrained_cfg["architecture"]


def export_timm(trained: TrainedModel, out: Path, tolerance: float = 1e-4, license: str | None = None) -> dict:
    """timm's hub layout; ``pretrained_cfg`` says these are our weights (tag ``deit_train``, the ``license`` given
    or none) instead of the Facebook weights the architecture's default config describes."""
    import timm
    from timm.models import save_for_hf

    model = trained.model.encoder if trained.task == "simmim" else trained.model
    args = timm_model_args(model)
    pre = trained.preprocessing
    data_config = {"input_size": (model.pretrained_cfg["input_size"][0], pre.image_size, pre.image_size),
                   "mean": pre.mean, "std": pre.std, "crop_pct": pre.crop_pct, "interpolation": pre.interpolation}
    name = canonical_timm_name(model, args)
    model.pretrained_cfg = {**model.pretrained_cfg, "architecture": name, "tag": TIMM_TAG, "license": license}
    labels = trained.class_names if len(trained.class_names) == getattr(model, "num_classes", -1) else None
    out.mkdir(parents=True, exist_ok=True)
    save_for_hf(model, str(out), model_args={k: v for k, v in args.items() if k == "norm_layer"},
                model_config={"label_names": labels} if labels else None, safe_serialization=True,
                data_config=data_config)
    config = json.loads((out / "config.json").read_text())
    overlay = {**config["pretrained_cfg"], "file": str(out / "model.safetensors")}
    reloaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **config.get("model_args", {})).eval()
    pixels, _ = _probe(trained)
    with torch.no_grad():
        difference = compare({"logits": model(pixels)}, {"logits": reloaded(pixels)}, f"timm {name} from {out}",
                             tolerance)
    return {"format": "timm", "out": str(out), "architecture": name, "max_abs_difference": difference,
            "load": f"timm.create_model('local-dir:{out}', pretrained=True)",
            "model_args": config.get("model_args", {})}


def export(ckpt: str | Path, format: str, out: str | Path, hf_class: str = "auto", tolerance: float = 1e-4,
           license: str | None = None, weights: str = "student") -> dict:
    """Export ``ckpt`` to ``out``; returns what was written and the largest output difference found.
    ``weights="ema"`` exports the EMA the run kept (``module.ema_decay``): a plain model of the same class."""
    if format not in ("hf", "timm"):
        raise ConfigError(f"format={format} is not supported: use format=hf (transformers) or format=timm")
    if not out:
        raise ConfigError("out is not set: pass out=<directory to write>")
    if format == "hf":
        try:
            import transformers  # noqa: F401  (fail before the checkpoint is read)
        except ImportError as exc:
            raise ConfigError(HF_INSTALL) from exc
    trained = load_trained_model(ckpt, weights=weights)
    out = Path(out).expanduser()
    if format == "hf":
        return {**export_hf(trained, out, hf_class, tolerance), "weights": weights}
    return {**export_timm(trained, out, tolerance, license), "weights": weights}


def main(cfg: DictConfig) -> None:
    if not cfg.ckpt:
        raise ConfigError(f"ckpt is not set: pass ckpt=<run_dir>/checkpoints/last.ckpt\n{USAGE}")
    result = export(cfg.ckpt, cfg.format, cfg.out, cfg.hf_class, float(cfg.tolerance), cfg.license, cfg.weights)
    print(json.dumps(result, indent=2))


def cli() -> None:
    """The command line: ``deit-export`` or ``python -m deit_train.export``."""
    run_main(main, DEFAULTS, USAGE)


if __name__ == "__main__":
    cli()
