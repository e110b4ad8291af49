"""Evaluation metrics of the classification module: per head, the averaged prediction, and the teacher."""
from __future__ import annotations

from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from deit_train.models.deit import average_heads
from deit_train.modules.disagreement import Disagreement, disagreement_pairs, metric_name


def _topk(num_classes: int, postfix: str) -> MetricCollection:
    return MetricCollection(
        {"top1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
         "top5": MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro")},
        postfix=postfix,
    )


class EvalMetrics(nn.Module):
    """``<stage>/top1|top5`` (the prediction: average of the heads when distilled), ``_cls`` and ``_dist``
    per head, ``teacher/<stage>_top1``, ``<stage>/agreement`` (student prediction == teacher's) and
    ``<stage>/disagree_<a>_<b>`` for each pair of teacher, heads and prediction (paper Tab. 4).
    Metric states are synced across ranks by torchmetrics when logged."""

    def __init__(self, stage: str, num_classes: int, distilled: bool, with_teacher: bool) -> None:
        super().__init__()
        self.stage = stage
        self.prediction = _topk(num_classes, "")
        self.heads = nn.ModuleDict({"cls": _topk(num_classes, "_cls")})
        if distilled:
            self.heads["dist"] = _topk(num_classes, "_dist")
        self.teacher = MulticlassAccuracy(num_classes, top_k=1, average="micro") if with_teacher else None
        self.agreement = MulticlassAccuracy(num_classes, top_k=1, average="micro") if with_teacher else None
        available = ("cls", "dist", "pred") if distilled else ("cls",)
        self.disagreement = nn.ModuleDict({f"{a}_{b}": Disagreement() for a, b in
                                           disagreement_pairs(available + (("teacher",) if with_teacher else ()))})

    def update(self, target: Tensor, cls: Tensor, dist: Tensor | None, teacher: Tensor | None,
               prediction: Tensor | None = None) -> None:
        """``prediction``: the student's (its distillation method's); default the heads averaged (DeiT)."""
        prediction = average_heads(cls, dist) if prediction is None else prediction
        self.prediction.update(prediction, target)
        self.heads["cls"].update(cls, target)
        if dist is not None:
            self.heads["dist"].update(dist, target)
        if teacher is not None and self.teacher is not None:
            self.teacher.update(teacher, target)
            self.agreement.update(prediction, teacher.argmax(dim=-1))
        logits = {"teacher": teacher, "cls": cls, "dist": dist, "pred": prediction}
        for pair, metric in self.disagreement.items():
            a, b = pair.split("_")
            metric.update(logits[a], logits[b])

    def loggable(self) -> dict[str, object]:
        """Metric objects keyed by their logged name (Lightning computes, syncs and resets them)."""
        out = {f"{self.stage}/{k}": m for k, m in self.prediction.items(keep_base=False, copy_state=False)}
        for collection in self.heads.values():
            out.update({f"{self.stage}/{k}": m for k, m in collection.items(keep_base=False, copy_state=False)})
        if self.teacher is not None:
            out[f"teacher/{self.stage}_top1"] = self.teacher
            out[f"{self.stage}/agreement"] = self.agreement
        out.update({metric_name(self.stage, *pair.split("_")): m for pair, m in self.disagreement.items()})
        return out
