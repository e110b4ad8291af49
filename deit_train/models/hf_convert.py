"""Weights between timm's ViT/DeiT layout and HF transformers' DeiT/ViT layout, without importing transformers.

timm keeps one fused ``qkv`` projection per block; transformers keeps separate query/key/value layers. Hub files
use the transformers 4 names (``encoder.layer.N.attention.attention.query``); transformers 5 renames them in
memory (``layers.N.attention.q_proj``) and writes the 4 names back on save. Both are read here.

Heads: ``DeiTForImageClassificationWithTeacher`` has ``cls_classifier`` + ``distillation_classifier`` (timm's
``head`` + ``head_dist``), ``DeiTForImageClassification``/``ViTForImageClassification`` one ``classifier``;
``*ForMaskedImageModeling`` a 1x1 conv ``decoder.0`` before a pixel shuffle.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from deit_train.errors import ConfigError

# timm block suffix -> transformers 4 (hub) suffix, and -> transformers 5 (in-memory) suffix
_BLOCK_KEYS = {
    "norm1": ("layernorm_before", "layernorm_before"),
    "attn.proj": ("attention.output.dense", "attention.o_proj"),
    "norm2": ("layernorm_after", "layernorm_after"),
    "mlp.fc1": ("intermediate.dense", "mlp.fc1"),
    "mlp.fc2": ("output.dense", "mlp.fc2"),
}
_QKV = {"hub": ("attention.attention.query", "attention.attention.key", "attention.attention.value"),
        "v5": ("attention.q_proj", "attention.k_proj", "attention.v_proj")}
_LAYER = {"hub": "encoder.layer", "v5": "layers"}
# timm top-level key -> key under the backbone prefix (``deit.`` / ``vit.``)
_EMBED_KEYS = {
    "cls_token": "embeddings.cls_token",
    "dist_token": "embeddings.distillation_token",
    "pos_embed": "embeddings.position_embeddings",
    "mask_token": "embeddings.mask_token",
    "patch_embed.proj": "embeddings.patch_embeddings.projection",
    "norm": "layernorm",
}
# HF head -> timm head, per HF class
_HEADS = {
    "DeiTForImageClassificationWithTeacher": {"cls_classifier": "head", "distillation_classifier": "head_dist"},
    "DeiTForImageClassification": {"classifier": "head"},
    "ViTForImageClassification": {"classifier": "head"},
    "DeiTForMaskedImageModeling": {"decoder.0": "decoder.0"},
    "ViTForMaskedImageModeling": {"decoder.0": "decoder.0"},
}
HF_CLASSES = tuple(_HEADS)


def backbone_prefix(hf_class: str) -> str:
    return "deit" if hf_class.startswith("DeiT") else "vit"


def _split_param(key: str) -> tuple[str, str]:
    """``blocks.0.attn.qkv.weight`` -> (``blocks.0.attn.qkv``, ``weight``); parameters without a module stay whole."""
    module, _, param = key.rpartition(".")
    return (module, param) if param in ("weight", "bias") else (key, "")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def timm_to_hf(state: dict[str, Tensor], hf_class: str, style: str = "hub",
               head_map: dict[str, str] | None = None) -> dict[str, Tensor]:
    """timm VisionTransformer(/Distilled) weights -> the state dict of ``hf_class`` (``style``: hub or v5 names).

    ``head_map`` (timm module -> HF module) overrides the class's default heads, e.g. a SimMIM decoder's name.
    """
    prefix = backbone_prefix(hf_class)
    heads = {timm: hf for hf, timm in _HEADS[hf_class].items()} if head_map is None else head_map
    out: dict[str, Tensor] = {}
    unused = []
    for key, value in state.items():
        module, param = _split_param(key)
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if match:
            layer, sub = match.groups()
            base = f"{prefix}.{_LAYER[style]}.{layer}"
            if sub == "attn.qkv":
                for name, part in zip(_QKV[style], value.chunk(3, dim=0)):
                    out[_join(base, name, param)] = part.clone()
            elif sub in _BLOCK_KEYS:
                out[_join(base, _BLOCK_KEYS[sub][style == "v5"], param)] = value
            else:
                unused.append(key)
        elif module in _EMBED_KEYS:
            out[_join(prefix, _EMBED_KEYS[module], param)] = value
        elif module in heads:
            out[_join(heads[module], param)] = value
        else:
            unused.append(key)
    if unused:
        raise ConfigError(f"cannot express these timm weights in {hf_class}: {unused[:8]}")
    return out


def hf_to_timm(state: dict[str, Tensor], head_map: dict[str, str] | None = None) -> dict[str, Tensor]:
    """An HF DeiT/ViT state dict (hub or transformers 5 names, any of the task heads, or a bare
    ``DeiTModel``/``ViTModel``) -> timm keys. ``head_map`` (HF module -> timm module) adds or renames heads."""
    heads = {hf: timm for per_class in _HEADS.values() for hf, timm in per_class.items()}
    heads.update(head_map or {})
    prefix = next((p for p in ("deit.", "vit.") if any(k.startswith(p + "embeddings.") for k in state)), "")
    embed = {hf: timm for timm, hf in _EMBED_KEYS.items()}
    block = {hf: timm for timm, names in _BLOCK_KEYS.items() for hf in names}
    qkv_names = {name: i for names in _QKV.values() for i, name in enumerate(names)}
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], list[Tensor | None]] = {}
    unknown = []
    for key, value in state.items():
        module, param = _split_param(key)
        if module in heads:
            out[_join(heads[module], param)] = value
            continue
        local = module[len(prefix):] if module.startswith(prefix) else None
        match = re.fullmatch(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)", local or "")
        if match:
            layer, sub = match.groups()
            if sub in qkv_names:
                qkv.setdefault((f"blocks.{layer}.attn.qkv", param), [None] * 3)[qkv_names[sub]] = value
            elif sub in block:
                out[_join(f"blocks.{layer}", block[sub], param)] = value
            else:
                unknown.append(key)
        elif local in embed:
            out[_join(embed[local], param)] = value
        elif local == "pooler.dense":
            continue  # the tanh pooler of a bare DeiTModel/ViTModel: no counterpart in timm, unused by the heads
        else:
            unknown.append(key)
    for (module, param), parts in qkv.items():
        if any(p is None for p in parts):
            raise ConfigError(f"HF checkpoint lacks part of query/key/value for {module}.{param}")
        out[_join(module, param)] = torch.cat(parts, dim=0)
    if unknown:
        raise ConfigError(f"HF checkpoint has weights without a timm counterpart: {unknown[:8]}"
                          f"{'...' if len(unknown) > 8 else ''}")
    return out


def is_hf_directory(path: str | Path) -> bool:
    """A ``save_pretrained``-style folder (config.json + weights) of transformers or timm."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def read_hf_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "config.json").read_text())


def read_hf_directory(directory: str | Path) -> dict[str, Tensor]:
    """timm-keyed weights of a ``save_pretrained`` directory of a transformers DeiT/ViT model (read without
    transformers), or of a timm hub-layout directory (``architecture`` in config.json, timm keys already)."""
    directory = Path(directory)
    config = read_hf_config(directory)
    timm_layout = "architecture" in config and "model_type" not in config  # timm's save_for_hf / hub layout
    if not timm_layout and config.get("model_type") not in ("deit", "vit"):
        raise ConfigError(f"{directory} holds a '{config.get('model_type')}' model: only HF DeiT/ViT directories "
                          "(model_type deit or vit) can start a DeiT student")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"{directory} uses hidden_act={config['hidden_act']}; timm's DeiT uses exact GELU")
    files = hf_weight_files(directory)
    if not files:
        raise ConfigError(f"{directory} has config.json but no model.safetensors or pytorch_model.bin")
    if files[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        state = {k: v for f in files for k, v in load_file(str(f)).items()}
    else:
        state = torch.load(files[0], map_location="cpu", weights_only=True)
    return state if timm_layout else hf_to_timm(state)


def hf_weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a ``save_pretrained`` directory: its (sharded) ``model*.safetensors``, else its
    ``pytorch_model.bin``; none when it holds only a config."""
    directory = Path(directory)
    return sorted(directory.glob("model*.safetensors")) or [
        path for path in [directory / "pytorch_model.bin"] if path.is_file()]
