"""Token diagnostics of a distilled DeiT (Touvron et al., 2021, Sec. 5.1): the class and distillation tokens
start nearly orthogonal (cosine 0.06) and converge through depth (0.93 at the last layer), while their heads'
weights stay apart.

Measured on the validation data only (forward hooks during validation epochs), so training pays nothing.
"""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor, nn

from deit_train.run.plots import save_figure
from deit_train.models.deit import is_distilled

log = logging.getLogger(__name__)


def token_cosine(tokens: Tensor) -> Tensor:
    """Per-sample cosine similarity between token 0 (class) and token 1 (distillation) of ``(B, N, D)``."""
    return F.cosine_similarity(tokens[:, 0].float(), tokens[:, 1].float(), dim=-1)


def head_weight_cosine(model: nn.Module) -> float:
    """Cosine between the flattened weight matrices of the class head and the distillation head."""
    return F.cosine_similarity(model.head.weight.detach().flatten().float(),
                               model.head_dist.weight.detach().flatten().float(), dim=0).item()


def depth_points(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where the tokens are read, ``depth + 1`` points: the input of the first block (patch + position
    embeddings and the tokens), the output of each block but the last, and the output norm (what the heads see)."""
    blocks = list(model.blocks)
    return [(blocks[0], "input"), *[(b, "output") for b in blocks[:-1]], (model.norm, "output")]


class TokenDiagnostics(Callback):
    """Logs ``diag/cls_dist_cos/layer_<i>`` (mean cosine between the class and distillation token, layer 0 =
    the embeddings, layer ``depth`` = after the output norm) and ``diag/head_weight_cos`` every validation epoch
    of a distilled student; draws ``<out_dir>/cls_dist_cosine.png`` at the end of fitting. Students without
    distillation token are left alone."""

    def __init__(self, out_dir: str | None = None, filename: str = "cls_dist_cosine.png") -> None:
        self.out_dir = Path(out_dir) if out_dir else None
        self.filename = filename
        self.history: list[dict] = []  # per validated epoch: {"epoch", "cosine": [...], "head_weight_cosine"}
        self._handles: list = []
        self._sums: Tensor | None = None
        self._count: Tensor | None = None
        self._recording = False

    @staticmethod
    def _student(pl_module: L.LightningModule) -> nn.Module | None:
        student = getattr(pl_module, "student", None)
        return student if student is not None and is_distilled(student) else None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before the first forward: torch.compile traces the hooks present when it compiles and does not guard on
        # hooks added later (a compiled student would skip them). They record only in validation epochs.
        student = self._student(pl_module)
        if student is not None:
            self._attach(student)

    def _attach(self, student: nn.Module) -> None:
        if self._handles:
            return
        for index, (module, where) in enumerate(depth_points(student)):
            if where == "input":
                hook = module.register_forward_pre_hook(lambda m, args, i=index: self._record(i, args[0]))
            else:
                hook = module.register_forward_hook(lambda m, args, out, i=index: self._record(i, out))
            self._handles.append(hook)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        student = self._student(pl_module)
        if student is None or trainer.sanity_checking:
            return
        self._attach(student)
        dtype = torch.float32 if pl_module.device.type == "mps" else torch.float64  # MPS has no float64
        self._sums = torch.zeros(len(self._handles), dtype=dtype, device=pl_module.device)
        self._count = torch.zeros((), dtype=dtype, device=pl_module.device)
        self._recording = True

    def _record(self, index: int, tokens: Tensor) -> None:
        if self._recording:  # a constant to a compiled graph: training and sanity-check graphs stay hook-free
            self._add(index, tokens)

    @torch.compiler.disable  # runs eagerly (a graph break in the recording validation graph only)
    def _add(self, index: int, tokens: Tensor) -> None:
        cosine = token_cosine(tokens.detach())
        self._sums[index] += cosine.sum().to(self._sums.dtype)
        if index == 0:  # every forward passes the first point once
            self._count += cosine.numel()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._recording:
            return
        self._recording = False
        sums = trainer.strategy.reduce(self._sums, reduce_op="sum")
        count = trainer.strategy.reduce(self._count, reduce_op="sum")
        if count.item() == 0:  # e.g. limit_val_batches=0
            log.info("token diagnostics: no validation forward reached the student's blocks; nothing logged")
            return
        cosine = (sums / count).tolist()
        weights = head_weight_cosine(self._student(pl_module))
        for index, value in enumerate(cosine):
            pl_module.log(f"diag/cls_dist_cos/layer_{index}", value, on_epoch=True, rank_zero_only=True)
        pl_module.log("diag/head_weight_cos", weights, on_epoch=True, rank_zero_only=True)
        self.history.append({"epoch": trainer.current_epoch, "cosine": cosine, "head_weight_cosine": weights})

    def run_results(self) -> dict:
        """The last validated epoch's values, for ``results.json``."""
        if not self.history:
            return {}
        last = self.history[-1]
        results = {"cls_dist_cosine": last["cosine"], "head_weight_cosine": last["head_weight_cosine"]}
        if self.out_dir is not None and (self.out_dir / self.filename).is_file():
            results["cls_dist_cosine_plot"] = str(self.out_dir / self.filename)
        return results

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.history and self.out_dir is not None:
            plot_token_cosine(self.history, self.out_dir / self.filename)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))


def plot_token_cosine(history: list[dict], out: Path) -> Path:
    """Cosine vs depth, one curve per validated epoch (light = early, dark = late)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.get_cmap("viridis_r")
    for index, record in enumerate(history):
        last = index == len(history) - 1
        label = f"epoch {record['epoch']}" if index == 0 or last else None
        ax.plot(range(len(record["cosine"])), record["cosine"], "o-" if last else "-", markersize=4,
                color=colors(0.15 + 0.85 * index / max(len(history) - 1, 1)), alpha=1.0 if last else 0.5,
                label=label)
    depth = len(history[-1]["cosine"]) - 1
    ax.set_xticks(range(depth + 1), ["emb", *map(str, range(1, depth)), f"{depth}+norm"])
    ax.set(xlabel="layer", ylabel="cos(class token, distillation token)", ylim=(-1.05, 1.05),
           title=f"class vs distillation token (head weights cos {history[-1]['head_weight_cosine']:.2f})")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, out)
