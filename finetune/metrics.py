"""Classification metrics accumulated over a whole evaluation pass."""

from __future__ import annotations

from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
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

    per_class_name = "acc"

    @property
    def per_class(self) -> list[float]:
        return self.per_class_acc

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


# ------------------------------------------------------------ multi-label (task=multilabel)
DEFAULT_THRESHOLD = 0.5


@dataclass
class MultilabelResult:
    """Loss, macro average precision, F1 at the decision thresholds and exact match over sigmoid scores.

    ``scores`` (float64 sigmoid probabilities, [N, C]) and ``targets`` (bool, [N, C]) are kept, in the
    evaluation's image order: thresholds are tuned on them (`tune_thresholds`) and evaluate reports from them.
    """

    loss: float
    mAP: float  # macro AP over the classes with at least one positive
    f1: float  # macro F1 at ``thresholds``
    exact_match: float  # images whose predicted set is their label set
    per_class_ap: list[float | None]  # None: the class has no positive here
    per_class_f1: list[float]
    thresholds: list[float]
    tuned_thresholds: list[float]  # per class, the F1-maximising threshold on these scores (saved with the weights)
    scores: np.ndarray
    targets: np.ndarray
    confusion = None  # no confusion matrix for label sets
    per_class_name = "f1"

    @property
    def per_class(self) -> list[float]:
        return self.per_class_f1

    def scalars(self, prefix: str = "val") -> dict[str, float]:
        return {f"{prefix}/loss": self.loss, f"{prefix}/mAP": self.mAP, f"{prefix}/f1": self.f1,
                f"{prefix}/exact_match": self.exact_match}


class MultilabelAccumulator:
    """Keeps every batch's sigmoid scores and targets under its batch number; `result` computes the metrics
    over all of them at once (AP is not a sum of per-batch parts). Under DDP the batches of every process
    are gathered and put in batch order first: the scores of the whole set, never an average of per-rank APs.
    """

    def __init__(self, num_classes: int, *, total_batches: int | None = None,
                 thresholds: list[float] | None = None):
        self.num_classes = num_classes
        self.total_batches = total_batches
        self.thresholds = list(thresholds) if thresholds is not None else [DEFAULT_THRESHOLD] * num_classes
        self.batches: dict[int, tuple[np.ndarray, np.ndarray, float]] = {}
        self.count = 0
        self.reduced_count = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss_sum: float, *, batch: int | None = None) -> None:
        """Add one batch; ``loss_sum``: its loss summed over images (each image's mean over classes)."""
        scores = torch.sigmoid(logits.float()).double().cpu().numpy()
        self.batches[len(self.batches) if batch is None else batch] = (scores, target.cpu().numpy() > 0.5, loss_sum)
        self.count += target.shape[0]

    def result(self, world: World | None = None) -> MultilabelResult:
        batches = dict(self.batches)
        if world is not None and world.distributed:
            for part in world.gather(self.batches):
                batches.update(part)
        ordered = [batches[b] for b in sorted(batches)]
        empty = np.zeros((0, self.num_classes))
        scores = np.concatenate([s for s, _, _ in ordered]) if ordered else empty
        targets = np.concatenate([t for _, t, _ in ordered]) if ordered else empty.astype(bool)
        self.reduced_count = len(scores)
        loss = _sum_in_order(loss for _, _, loss in ordered) / max(len(scores), 1)
        return multilabel_result(scores, targets, loss=loss, thresholds=self.thresholds)


def multilabel_result(scores: np.ndarray, targets: np.ndarray, *, loss: float,
                      thresholds: list[float]) -> MultilabelResult:
    """The metrics of ``scores`` against ``targets`` at ``thresholds`` (a class is predicted at score >= its threshold)."""
    aps = [average_precision(scores[:, c], targets[:, c]) for c in range(scores.shape[1])]
    present = [ap for ap in aps if ap is not None]
    predicted = scores >= np.asarray(thresholds)[None, :]
    f1s = [f1_score(predicted[:, c], targets[:, c]) for c in range(scores.shape[1])]
    exact = float((predicted == targets).all(axis=1).mean()) if len(scores) else 0.0
    return MultilabelResult(loss=loss, mAP=float(np.mean(present)) if present else 0.0, f1=float(np.mean(f1s)),
                            exact_match=exact, per_class_ap=aps, per_class_f1=f1s, thresholds=list(thresholds),
                            tuned_thresholds=tune_thresholds(scores, targets), scores=scores, targets=targets)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Average precision of one class (scikit-learn's ``average_precision_score``: the sum over distinct
    score thresholds of precision times the step in recall); None without a positive.

    >>> round(average_precision(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1], bool)), 6)
    0.833333
    """
    total = int(positive.sum())
    if total == 0:
        return None
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last image at each distinct score
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall_step = np.diff(np.r_[0.0, tp]) / total
    return float(np.sum(recall_step * precision))


def f1_score(predicted: np.ndarray, positive: np.ndarray) -> float:
    """F1 of one class; 0.0 when nothing is predicted and nothing is positive (scikit-learn's default
    ``zero_division``)."""
    tp = int((predicted & positive).sum())
    denominator = int(predicted.sum()) + int(positive.sum())
    return 2 * tp / denominator if denominator else 0.0


def precision_recall(predicted: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    tp = int((predicted & positive).sum())
    return tp / max(int(predicted.sum()), 1), tp / max(int(positive.sum()), 1)


def tune_thresholds(scores: np.ndarray, targets: np.ndarray, *, default: float = DEFAULT_THRESHOLD) -> list[float]:
    """Per class, the threshold that maximises F1 on these scores (ties: the highest such threshold; a class
    without a positive keeps ``default``). A threshold is a score itself: predicted at score >= it.

    >>> tune_thresholds(np.array([[0.2], [0.3], [0.9]]), np.array([[False], [True], [True]]))
    [0.3]
    """
    out = []
    for c in range(scores.shape[1]):
        positive = targets[:, c]
        total = int(positive.sum())
        if total == 0:
            out.append(default)
            continue
        order = np.argsort(-scores[:, c], kind="mergesort")
        ranked, hits = scores[order, c], positive[order]
        last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
        tp = np.cumsum(hits)[last]
        f1 = 2 * tp / ((last + 1) + total)
        best = int(np.flatnonzero(f1 == f1.max())[0])  # the first = highest threshold reaching the best F1
        out.append(float(ranked[last[best]]))
    return out
