"""The disagreement analysis of DeiT (Touvron et al., 2021, Tab. 4): for each pair of classifiers among the
teacher, the class head, the distillation head and the prediction (mean of the heads), the fraction of images
on which their top-1 decisions differ."""
from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor
from torchmetrics import Metric

CLASSIFIERS = ("teacher", "cls", "dist", "pred")


class Disagreement(Metric):
    """Fraction of samples on which the arg-max of two logit tensors differs (summed across ranks)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("different", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, a: Tensor, b: Tensor) -> None:
        self.different += (a.argmax(dim=-1) != b.argmax(dim=-1)).sum()
        self.total += a.shape[0]

    def compute(self) -> Tensor:
        return self.different.float() / self.total.clamp(min=1)


def disagreement_pairs(available: tuple[str, ...]) -> list[tuple[str, str]]:
    """The pairs of the classifiers a run has, in the order of :data:`CLASSIFIERS` (as in the paper's table)."""
    return list(combinations([c for c in CLASSIFIERS if c in available], 2))


def metric_name(stage: str, a: str, b: str) -> str:
    return f"{stage}/disagree_{a}_{b}"


def disagreement_matrix(results: dict, stage: str) -> dict[tuple[str, str], float]:
    """``(a, b) -> fraction`` read back from logged or saved metrics (``results.json``), both orders filled in."""
    matrix = {}
    for a, b in combinations(CLASSIFIERS, 2):
        value = results.get(metric_name(stage, a, b))
        if value is not None:
            matrix[(a, b)] = matrix[(b, a)] = float(value)
    return matrix


def disagreement_table(results: dict):
    """A rich table of the disagreement matrix, cells ``test | val`` (the tested checkpoint | the last validation
    epoch); ``None`` when there is none."""
    from rich.table import Table

    test, val = disagreement_matrix(results, "test"), disagreement_matrix(results, "last_epoch/val")
    present = [c for c in CLASSIFIERS if any(c in pair for pair in {**test, **val})]
    if not present:
        return None
    table = Table("", *present[1:], title="disagreement (fraction of images, paper Tab. 4): test | val (last epoch)")
    for row, a in enumerate(present[:-1]):
        cells = []
        for col, b in enumerate(present[1:], start=1):
            if col <= row:
                cells.append("")
                continue
            values = [m.get((a, b)) for m in (test, val)]
            cells.append(" | ".join("-" if v is None else f"{v:.4f}" for v in values))
        table.add_row(a, *cells)
    return table
