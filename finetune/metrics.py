"""Classification metrics accumulated over a whole evaluation pass."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def infer_mode(monitor: str) -> str:
    """``min`` for losses and errors, ``max`` for everything else (accuracies)."""
    return "min" if "loss" in monitor or "err" in monitor else "max"


def is_better(value: float, than: float | None, *, mode: str, min_delta: float = 0.0) -> bool:
    """Whether ``value`` improves on ``than`` by more than ``min_delta`` (``None``: nothing to beat).

    The one definition of "better" for early stopping, ``best``, and the top-k files.
    """
    if than is None:
        return True
    return (value - than if mode == "max" else than - value) > min_delta


@dataclass
class EvalResult:
    """Loss, top-k accuracy, per-class accuracy and the confusion matrix (rows = true class)."""

    loss: float
    acc1: float
    acc5: float | None  # None with fewer than 5 classes
    per_class_acc: list[float]
    confusion: torch.Tensor  # int64 [C, C]

    def scalars(self, prefix: str = "val") -> dict[str, float]:
        """``{prefix}/loss``, ``{prefix}/acc1`` and, with at least 5 classes, ``{prefix}/acc5``."""
        out = {f"{prefix}/loss": self.loss, f"{prefix}/acc1": self.acc1}
        if self.acc5 is not None:
            out[f"{prefix}/acc5"] = self.acc5
        return out


class MetricAccumulator:
    """Sums what ``EvalResult`` needs, batch by batch, on the logits' device."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.loss_sum = 0.0
        self.count = 0
        self.top5_hits = 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: float) -> None:
        """Add one batch; ``loss_sum`` is its loss summed over samples (`result` takes the mean)."""
        self.loss_sum += loss_sum
        self.count += target.numel()
        pred = logits.argmax(dim=1)
        index = (target * self.num_classes + pred).cpu()  # (true, predicted) as one flat index: one bincount
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view_as(self.confusion)
        if self.num_classes >= 5:
            top5 = logits.topk(5, dim=1).indices
            self.top5_hits += int((top5 == target[:, None]).any(dim=1).sum())

    def result(self) -> EvalResult:
        """The metrics over every batch added so far."""
        count = max(self.count, 1)
        support = self.confusion.sum(dim=1).clamp(min=1)
        per_class = (self.confusion.diagonal() / support).tolist()
        return EvalResult(
            loss=self.loss_sum / count,
            acc1=float(self.confusion.diagonal().sum()) / count,
            acc5=self.top5_hits / count if self.num_classes >= 5 else None,
            per_class_acc=per_class,
            confusion=self.confusion.clone(),
        )
