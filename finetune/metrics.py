"""Classification metrics accumulated over a whole evaluation pass."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from finetune.distributed import World


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
    """Sums what ``EvalResult`` needs, batch by batch, on the logits' device.

    Exact under DDP: each batch's loss sum is kept under the batch's number in the whole
    evaluation (``batch``), every count is an integer, and `result` sums all of it over the
    processes in one all-reduce, then adds the batch losses in batch order, as one process would.
    Each process evaluating whole batches of the single-process order (`EvalBatches`), the result
    is bit-identical to a single-process evaluation at any world size.
    """

    def __init__(self, num_classes: int, *, total_batches: int | None = None):
        self.num_classes = num_classes
        self.batch_losses: dict[int, float] = {}  # batch number -> its summed loss
        self.total_batches = total_batches
        self.count = 0
        self.reduced_count = 0  # images over every process, after `result`
        self.top5_hits = 0
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    @property
    def loss_sum(self) -> float:
        return _sum_in_order(self.batch_losses[b] for b in sorted(self.batch_losses))

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: float, *, batch: int | None = None) -> None:
        """Add one batch (number ``batch`` of the whole evaluation; default: the next); ``loss_sum`` is
        its loss summed over samples (`result` takes the mean)."""
        self.batch_losses[len(self.batch_losses) if batch is None else batch] = loss_sum
        self.count += target.numel()
        pred = logits.argmax(dim=1)
        index = (target * self.num_classes + pred).cpu()  # (true, predicted) as one flat index: one bincount
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view_as(self.confusion)
        if self.num_classes >= 5:
            top5 = logits.topk(5, dim=1).indices
            self.top5_hits += int((top5 == target[:, None]).any(dim=1).sum())

    def result(self, world: World | None = None) -> EvalResult:
        """The metrics over every batch added so far, of every process of ``world`` (one all-reduce)."""
        loss_sum, count, top5_hits, confusion = self.loss_sum, self.count, self.top5_hits, self.confusion
        if world is not None and world.distributed:
            batches = max(self.total_batches or 0, max(self.batch_losses, default=-1) + 1)
            losses = [0.0] * batches
            for b, value in self.batch_losses.items():
                losses[b] = value
            packed = world.sum([*losses, count, top5_hits, *confusion.flatten().tolist()])
            losses = packed[:batches].tolist()  # x + 0.0 is exact: each entry is one process's value
            loss_sum = _sum_in_order(losses)
            count, top5_hits = int(packed[batches]), int(packed[batches + 1])
            confusion = packed[batches + 2:].round().to(torch.int64).view_as(self.confusion)
        self.reduced_count = count
        count = max(count, 1)
        support = confusion.sum(dim=1).clamp(min=1)
        per_class = (confusion.diagonal() / support).tolist()
        return EvalResult(
            loss=loss_sum / count,
            acc1=float(confusion.diagonal().sum()) / count,
            acc5=top5_hits / count if self.num_classes >= 5 else None,
            per_class_acc=per_class,
            confusion=confusion.clone(),
        )


def _sum_in_order(values) -> float:
    """Left to right, as ``+=`` in a loop does (the one order every world size uses)."""
    total = 0.0
    for value in values:
        total += value
    return total
