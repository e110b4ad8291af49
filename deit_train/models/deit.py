"""DeiT student backbones: timm's ``VisionTransformer`` / ``VisionTransformerDistilled`` (attention via SDPA).

Every size is a set of DeiTConfig-style numbers, so a custom size is a config file, not code.
"""
from __future__ import annotations

from functools import partial

import timm
from timm.models.deit import VisionTransformerDistilled
from torch import Tensor, nn

from deit_train.errors import ConfigError

# timm architecture names only pick the class (and the hub weights when ``pretrained`` is given);
# every dimension below overrides the name's defaults.
_ARCH = {False: "deit_tiny_patch16_224", True: "deit_tiny_distilled_patch16_224"}


def create_deit(
    *,
    image_size: int = 224,
    patch_size: int = 16,
    hidden_size: int = 192,
    num_hidden_layers: int = 12,
    num_attention_heads: int = 3,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_path_rate: float = 0.0,
    layer_norm_eps: float = 1e-6,
    init_values: float | None = None,
    global_pool: str = "token",
    num_channels: int = 3,
    num_classes: int = 1000,
    distilled: bool = False,
    pretrained: str | None = None,
    init_from: str | None = None,
) -> nn.Module:
    """Build a DeiT student.

    Args:
        distilled: add the distillation token and head (``VisionTransformerDistilled``).
        pretrained: a timm model name with hub weights (e.g. ``deit_small_distilled_patch16_224.fb_in1k``);
            needs network access and dimensions matching the config.
        init_values: layer scale (per-channel scale on each residual branch, initialised to this value);
            None = off (DeiT), 0.1 = SimMIM's ViT.
        global_pool: ``token`` (the class token, DeiT) or ``avg`` (mean of the patch tokens, SimMIM's
            fine-tuning); a distilled student always reads its class and distillation tokens.
        init_from: a local checkpoint (ours, timm's, the official DeiT ``model`` file) to start from; see
            :func:`deit_train.models.checkpoint.load_student_weights`.
    """
    if image_size % patch_size:
        raise ConfigError(
            f"model.image_size={image_size} is not divisible by model.patch_size={patch_size}: "
            f"pick an image size that is a multiple of the patch size (e.g. {image_size // patch_size * patch_size})"
        )
    if hidden_size % num_attention_heads:
        raise ConfigError(
            f"model.hidden_size={hidden_size} is not divisible by model.num_attention_heads={num_attention_heads}"
        )
    if pretrained and ("distilled" in pretrained) != distilled:
        raise ConfigError(
            f"model.pretrained={pretrained} does not match model.distilled={distilled}: "
            "use a *_distilled_* name with a distillation token, a plain one without"
        )
    if distilled and global_pool != "token":
        raise ConfigError(f"model.global_pool={global_pool} does not apply to a distilled student (it reads its class "
                          "and distillation tokens): set model.global_pool=token")
    model = timm.create_model(
        pretrained or _ARCH[distilled],
        pretrained=bool(pretrained),
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=hidden_size,
        depth=num_hidden_layers,
        num_heads=num_attention_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_path_rate=drop_path_rate,
        init_values=init_values,
        global_pool=global_pool,
        norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps),
        in_chans=num_channels,
        num_classes=num_classes,
    )
    if init_from:
        from deit_train.models.checkpoint import load_student_weights

        load_student_weights(model, init_from)
    return model


def create_timm_classifier(name: str, num_classes: int, pretrained: bool = False, **kwargs) -> nn.Module:
    """Any timm classifier as a (CLS-only) student, e.g. the RegNet that becomes a teacher later."""
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)


def is_distilled(model: nn.Module) -> bool:
    return isinstance(model, VisionTransformerDistilled)


def forward_heads(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Class-head and distillation-head logits, in train and eval mode alike.

    timm's distilled model returns the two heads only in training mode; evaluation wants both
    (per-head accuracy), so the heads are applied here to the class and distillation tokens.
    """
    cls, dist, _ = forward_student(model, x)
    return cls, dist


def forward_student(model: nn.Module, x: Tensor, with_features: bool = False
                    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`forward_heads`, and with ``with_features`` the pooled features before the head(s) (timm's
    ``forward_head(pre_logits=True)``: a distilled student's class and distillation tokens averaged)."""
    features = model.forward_features(x)
    pooled = model.forward_head(features, pre_logits=True) if with_features else None
    if not is_distilled(model):
        return model.forward_head(features), None, pooled
    cls_token, dist_token = model.head_drop(features[:, 0]), model.head_drop(features[:, 1])
    return model.head(cls_token), model.head_dist(dist_token), pooled


def average_heads(cls: Tensor, dist: Tensor | None) -> Tensor:
    """The student's prediction: the class head, averaged with the distillation head when there is one (paper
    Sec. 5: the two heads' softmax inputs are added at test time)."""
    return cls if dist is None else (cls + dist) / 2
