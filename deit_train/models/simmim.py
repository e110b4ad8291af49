"""SimMIM (Xie et al., 2022): masked image modeling with a DeiT encoder and a one-layer pixel decoder.

The encoder is the classification student itself (timm ``VisionTransformer`` / ``VisionTransformerDistilled``
from :func:`deit_train.models.create_deit`), run through its own ``patch_embed``, ``_pos_embed``, ``blocks``
and ``norm``; the only addition is a learnable ``mask_token`` that replaces the patch embeddings of masked
patches before the position embedding is added. The cls (and dist) tokens are never masked. After
pretraining, ``encoder.*`` is exactly a student's state dict (see ``models/checkpoint.py``).

Same inputs as HuggingFace's ``DeiTForMaskedImageModeling``: ``pixel_values`` (batch, 3, H, W) and
``bool_masked_pos`` (batch, num_patches), True = masked.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import checkpoint_seq
from torch import Tensor, nn

from deit_train.errors import ConfigError

# Keys of a SimMIM state dict that only pretraining uses; a fine-tuned student leaves them behind.
PRETRAINING_ONLY_KEYS = ("mask_token", "decoder.")
ENCODER_PREFIX = "encoder."


class MaskGenerator:
    """SimMIM's random masking: the image is cut into ``mask_patch_size`` squares, exactly
    ``ceil(mask_ratio x count)`` of them are masked per image, and each masks every model patch it covers
    (a 32-pixel mask patch = 2x2 patches of a /16 ViT).

    ``__call__(batch_size)`` returns ``bool_masked_pos`` (batch, num_patches), row-major like the patch tokens.
    """

    def __init__(self, image_size: int, model_patch_size: int, mask_patch_size: int = 32,
                 mask_ratio: float = 0.6) -> None:
        if mask_patch_size % model_patch_size:
            raise ConfigError(f"module.mask_patch_size={mask_patch_size} is not a multiple of the model's patch "
                              f"size {model_patch_size}: pick a multiple (e.g. {2 * model_patch_size})")
        if image_size % mask_patch_size:
            raise ConfigError(f"model.image_size={image_size} is not divisible by module.mask_patch_size="
                              f"{mask_patch_size}: pick a mask patch size that divides the image size")
        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"module.mask_ratio={mask_ratio} must lie strictly between 0 and 1 (SimMIM: 0.6)")
        if image_size // mask_patch_size < 2:  # one square: ceil(ratio x 1) masks the whole image
            fits = [m for m in range(model_patch_size, image_size // 4 + 1, model_patch_size) if image_size % m == 0]
            hint = (f"e.g. module.mask_patch_size={fits[-1]} ({(image_size // fits[-1]) ** 2} squares)" if fits else
                    f"or a smaller model.patch_size than {model_patch_size}")
            raise ConfigError(f"module.mask_patch_size={mask_patch_size} cuts {image_size} px images into "
                              f"{(image_size // mask_patch_size) ** 2} mask square(s), so every image would be "
                              f"masked whole: pick at least a 2x2 grid, {hint}")
        self.grid = image_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.count = self.grid ** 2
        # ceil without float noise: 0.7 x 10 is 7.000000000000001 in floating point, and must give 7
        self.mask_count = math.ceil(round(self.count * mask_ratio, 9))
        self.num_patches = (self.grid * self.scale) ** 2

    def __call__(self, batch_size: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        scores = torch.rand(batch_size, self.count, generator=generator)
        chosen = scores.argsort(dim=1)[:, :self.mask_count]
        mask = torch.zeros(batch_size, self.count, dtype=torch.bool).scatter_(1, chosen, True)
        mask = mask.view(batch_size, self.grid, self.grid)
        mask = mask.repeat_interleave(self.scale, dim=1).repeat_interleave(self.scale, dim=2)
        return mask.flatten(1).to(device)


def pixel_mask(bool_masked_pos: Tensor, grid_size: tuple[int, int], patch_size: int) -> Tensor:
    """(batch, num_patches) patch mask -> (batch, 1, H, W) float pixel mask."""
    mask = bool_masked_pos.reshape(-1, *grid_size)
    mask = mask.repeat_interleave(patch_size, dim=1).repeat_interleave(patch_size, dim=2)
    return mask.unsqueeze(1).float()


def masked_l1_loss(pixel_values: Tensor, reconstruction: Tensor, mask: Tensor) -> Tensor:
    """L1 over masked pixels only, divided by (masked pixels x channels); ``mask`` is (batch, 1, H, W)."""
    per_pixel = F.l1_loss(reconstruction, pixel_values, reduction="none")
    return (per_pixel * mask).sum() / (mask.sum() + 1e-5) / pixel_values.shape[1]


class SimMIMOutput(NamedTuple):
    loss: Tensor | None
    reconstruction: Tensor


class SimMIM(nn.Module):
    """A DeiT encoder with a mask token, and a 1x1 conv + PixelShuffle decoder back to pixels.

    Args:
        encoder: a timm ViT/DeiT (``create_deit``). Its classifier(s) are removed: pretraining never uses them,
            and an untrained head in the checkpoint (or without gradients under DDP) helps no one.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        if not hasattr(encoder, "patch_embed") or not hasattr(encoder, "_pos_embed"):
            raise ConfigError(f"SimMIM needs a ViT/DeiT encoder (timm VisionTransformer), got "
                              f"{type(encoder).__name__}: use a deit_* model config")
        if encoder.num_classes:
            encoder.reset_classifier(0)
        self.encoder = encoder
        embed_dim = encoder.embed_dim
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.num_channels = encoder.patch_embed.proj.in_channels
        # the decoder's upsampling factor: one token becomes one patch of pixels
        self.encoder_stride = self.patch_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = nn.Sequential(
            nn.Conv2d(embed_dim, self.encoder_stride ** 2 * self.num_channels, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.encoder.patch_embed.grid_size)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The encoder's own (position embedding, cls/dist tokens); timm's optimizer factory also skips every
        1-d parameter (norms, biases). The mask token (1, 1, dim) is weight-decayed, as in the official SimMIM
        (its ViT encoder does not list it)."""
        return {ENCODER_PREFIX + k for k in self.encoder.no_weight_decay()}

    def embed(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        """Patch embeddings, masked ones replaced by ``mask_token``, then cls/dist tokens and position
        embedding: (batch, prefix + num_patches, dim). A masked patch's pixels cannot reach the output."""
        encoder = self.encoder
        x = encoder.patch_embed(pixel_values)
        if bool_masked_pos is not None:
            if bool_masked_pos.shape != (x.shape[0], math.prod(x.shape[1:-1])):
                raise ValueError(f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}, expected "
                                 f"(batch, num_patches) = {(x.shape[0], math.prod(x.shape[1:-1]))}")
            masked = bool_masked_pos.reshape(x.shape[:-1]).unsqueeze(-1)
            x = torch.where(masked, self.mask_token.to(x.dtype), x)
        x = encoder._pos_embed(x)
        x = encoder.patch_drop(x)
        return encoder.norm_pre(x)

    def forward_encoder(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> Tensor:
        x = self.embed(pixel_values, bool_masked_pos)
        if self.encoder.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.encoder.blocks, x)
        else:
            x = self.encoder.blocks(x)
        return self.encoder.norm(x)

    def decode(self, tokens: Tensor) -> Tensor:
        """Patch tokens (the cls/dist tokens dropped) -> (batch, channels, H, W) pixels."""
        patches = tokens[:, self.encoder.num_prefix_tokens:]
        height, width = self.grid_size
        feature_map = patches.transpose(1, 2).reshape(patches.shape[0], -1, height, width)
        return self.decoder(feature_map)

    def forward(self, pixel_values: Tensor, bool_masked_pos: Tensor | None = None) -> SimMIMOutput:
        """Reconstruction, and the masked-pixel L1 loss when ``bool_masked_pos`` is given (as HF: no mask,
        no loss)."""
        reconstruction = self.decode(self.forward_encoder(pixel_values, bool_masked_pos))
        loss = None
        if bool_masked_pos is not None:
            mask = pixel_mask(bool_masked_pos, self.grid_size, self.patch_size)
            loss = masked_l1_loss(pixel_values, reconstruction, mask)
        return SimMIMOutput(loss, reconstruction)
