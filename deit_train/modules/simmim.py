"""LightningModule for SimMIM pretraining of a DeiT encoder (no labels).

Masks are drawn per batch on the module's device; validation and test use fixed masks (seeded per batch)
so ``val/loss`` is comparable across epochs and can pick the best checkpoint. Every
``image_log_every_n_steps`` training steps a grid (rows: original, masked input, reconstruction) goes to the
loggers that take images and to ``<run dir>/simmim_images/step<N>.png``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.utils import make_grid, save_image

from deit_train.models.simmim import MaskGenerator, SimMIM, pixel_mask
from deit_train.modules.finite import check_finite
from deit_train.modules.optim import OptimRecipe, RecipeTrainedModule


class SimMIMModule(RecipeTrainedModule):
    """Pretrains ``encoder`` with SimMIM.

    Args:
        encoder: a DeiT student from the ``model`` group (``create_deit``); its classifier is dropped.
        optim: the optimisation recipe (AdamW, linear lr scaling, cosine schedule with warmup).
        mask_patch_size, mask_ratio: SimMIM masking (32 and 0.6 for a 224 /16 ViT).
        image_log_every_n_steps: period of the reconstruction grid; 0 = never.
        num_logged_images: images (columns) in the grid.
        eval_mask_seed: seed of the fixed validation/test masks.
    """

    optimized_attr = "model"

    def __init__(
        self,
        encoder: nn.Module,
        optim: OptimRecipe,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        image_log_every_n_steps: int = 500,
        num_logged_images: int = 8,
        eval_mask_seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = SimMIM(encoder)
        self.optim = optim
        image_size = encoder.patch_embed.img_size[0]
        self.mask_generator = MaskGenerator(image_size, self.model.patch_size, mask_patch_size, mask_ratio)
        self.image_log_every_n_steps = image_log_every_n_steps
        self.num_logged_images = num_logged_images
        self.eval_mask_seed = eval_mask_seed
        self._last_image_step = -1

    def forward(self, images: Tensor, bool_masked_pos: Tensor | None = None):
        return self.model(images, bool_masked_pos)

    # ---- training -------------------------------------------------------------------------------
    def training_step(self, batch, batch_idx: int) -> Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        mask = self.mask_generator(len(images), device=images.device)
        loss, reconstruction = self.model(images, mask)
        check_finite(self, loss, lambda: {"reconstruction": reconstruction})
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                 rank_zero_only=True)
        step = self.global_step
        if self.image_log_every_n_steps and step % self.image_log_every_n_steps == 0 and step != self._last_image_step:
            self._last_image_step = step  # once per optimizer step, also with gradient accumulation
            self.log_reconstructions(images, mask, reconstruction.detach())
        return loss

    # ---- evaluation -----------------------------------------------------------------------------
    def _evaluate(self, stage: str, batch, batch_idx: int) -> None:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        generator = torch.Generator().manual_seed(self.eval_mask_seed + batch_idx)
        mask = self.mask_generator(len(images), generator=generator, device=images.device)
        loss, _ = self.model(images, mask)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=stage == "val", batch_size=len(images),
                 sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate("val", batch, batch_idx)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate("test", batch, batch_idx)

    # ---- reconstruction images ------------------------------------------------------------------
    def reconstruction_grid(self, images: Tensor, mask: Tensor, reconstruction: Tensor,
                            mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Tensor:
        """(3, H', W') image in [0, 1]: originals, masked inputs (masked patches grey), and the
        reconstruction (masked patches predicted, visible ones as given), one row each. ``mean``/``std``:
        the data's normalisation (unknown: each image is stretched to [0, 1])."""
        count = min(self.num_logged_images, len(images))
        images, reconstruction = images[:count].float(), reconstruction[:count].float()
        pixels = pixel_mask(mask[:count], self.model.grid_size, self.model.patch_size)
        original = _to_unit_range(images, mean, std)
        masked = original * (1 - pixels) + 0.5 * pixels
        predicted = original * (1 - pixels) + _to_unit_range(reconstruction, mean, std) * pixels
        return make_grid(torch.cat([original, masked, predicted]), nrow=count, padding=1, pad_value=1.0)

    @torch.no_grad()
    def log_reconstructions(self, images: Tensor, mask: Tensor, reconstruction: Tensor) -> None:
        if not self.trainer.is_global_zero:
            return
        datamodule = self.trainer.datamodule
        grid = self.reconstruction_grid(images, mask, reconstruction, getattr(datamodule, "mean", None),
                                        getattr(datamodule, "std", None)).cpu()
        step = self.global_step
        path = Path(self.trainer.default_root_dir) / "simmim_images" / f"step{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
        tag = "simmim/reconstruction"
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # W&B, Neptune
                logger.log_image(key=tag, images=[grid], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image(tag, grid, global_step=step)

    def parameter_counts(self) -> dict[str, int]:
        return {**super().parameter_counts(), "params/encoder": sum(p.numel() for p in self.model.encoder.parameters())}


def _to_unit_range(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    if mean is None or std is None:
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        high = images.amax(dim=(1, 2, 3), keepdim=True)
        return (images - low) / (high - low).clamp_min(1e-8)
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * std + mean).clamp(0, 1)
