"""The learning-rate range test behind ``optim.lr=auto`` (and ``python -m finetune.lr_find``).

Modules: ``curve`` (the updates at rising rates, the smoothed curve and the rule that picks a
rate, documented there), ``snapshot`` (everything the test changes, put back after it),
``trials`` (the candidates the curve gives, and successive halving over short trial
fine-tunes: the rate, and whether to freeze the backbone, that trains best in the run's budget)
and ``plot`` (the curve as an image).
`search` runs the range test on a built model, `run_trials` the trials.

Under DDP every process searches on its own data shard, without synchronising gradients, and
all train at rank 0's choice (``builders.choose_lr`` broadcasts it).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from finetune.errors import UserError
from finetune.lr_find.curve import (RULES, LRFind, num_updates_for, per_update_beta, range_test, smooth_losses,
                                    suggest, valley_pick)
from finetune.lr_find.plot import draw_curve
from finetune.lr_find.snapshot import Snapshot
from finetune.lr_find.trials import (candidate_rates, final_rung_updates, first_rung_updates, fold_count,
                                     frozen_candidate_rates, further_folds, holdout_split, max_folds, nearest, select,
                                     successive_halving)
from finetune.metrics import infer_mode
from finetune.trainer import TrainingDiverged, TrainState


def search(model: nn.Module, *, optimizer: torch.optim.Optimizer, trainer: Callable[[torch.optim.Optimizer], Any],
           loader: Any, accumulate: int = 1, start_lr: float = 1e-7, end_lr: float = 10.0,
           num_updates: int | None = None, rule: str = "valley") -> LRFind:
    """The range test on ``model`` exactly as it will train, then everything it changed put back.

    Args:
        model: The model, frozen as it will start training (the first phase of a freezing schedule).
        optimizer: A throwaway optimizer over the run's own parameter groups; each group keeps its
            ``lr_scale`` (head rate, backbone multiplier, layer decay), so the peak rate is searched
            and the ratios kept.
        trainer: Builds the run's loop around ``optimizer``: the test steps with its ``train_step``
            (same precision, accumulation and clipping as training).
        loader: The training loader, cycled when the test needs more updates than an epoch has.
        accumulate: Batches per update (``trainer.accumulate``).
        num_updates: Updates in the test; None: about 100, fewer for a small training set.
    """
    if rule not in RULES:
        raise UserError(f"optim.lr_find.rule '{rule}' is not known: use {', '.join(RULES)}")
    loop = trainer(optimizer)
    updates = num_updates or num_updates_for(len(loader), accumulate=accumulate)
    snapshot = Snapshot.take(model, loader, extras=[p for p in (loop.grad_scaler,) if p is not None])
    batches, progress = _cycle(loader), TrainState()

    def step(rate: float) -> float:
        for group in optimizer.param_groups:
            group["lr"] = rate * group.get("lr_scale", 1.0)
        loss = float("nan")
        for micro in range(accumulate):
            inputs, target = next(batches)
            try:
                loss = loop.train_step(inputs, target, progress, update=micro == accumulate - 1)
            except TrainingDiverged:  # the loss left the finite numbers: the test stops here
                return float("nan")
        return loss

    model.train()
    try:
        rates, losses = range_test(step, num_updates=updates, start_lr=start_lr, end_lr=end_lr)
    finally:
        batches.close()
        optimizer.zero_grad(set_to_none=True)
        snapshot.restore()
    return suggest(rates, losses, rule=rule)


def run_trials(model: nn.Module, *, candidates: list[Any], trainer: Callable[[Any, int], Any], loader: Any,
               holdout: Any, first_updates: int, final_updates: int | None = None, usual: Sequence[Any] = (),
               monitor: str | None = None, accumulate: int = 1,
               folds: Sequence[Callable[[], AbstractContextManager[tuple[Any, Any]]]] = ()) -> list[dict[str, Any]]:
    """Trial fine-tunes of ``model``, one per candidate and rung, each from the same starting point, then everything
    they changed put back (`finetune.lr_find.trials.select`: successive halving within each freeze option, then a
    final rung of ``final_updates`` between the winners and the ``usual`` recipes); returns the rungs (the last keeps
    the choice).

    Args:
        candidates: Peak rates, or ``(rate, freeze)`` pairs, safest first.
        trainer: ``trainer(candidate, updates)`` builds the run's loop with a fresh optimizer at the candidate's
            peak rate and the run's schedule compressed to ``updates`` updates (freezing the model as the
            candidate says: the snapshot puts back ``requires_grad`` and BatchNorm's pinned eval mode).
        loader: The trials' training loader (the training pool less ``holdout``), cycled.
        holdout: The loader of the held-out slice of the training pool that judges each trial (its loss).
        final_updates: The final rung's updates; None: one successive halving over all candidates, no final rung.
        usual: The usual recipes (each freeze option at the usual rate), always finalists.
        monitor: The metric the run picks its best epoch by (``checkpoint.monitor``, e.g. ``val/acc1``): it judges the
            final rung, whose trials are as long as the run (the loss breaks ties; the short rungs go by the loss
            alone, as accuracy on a few held-out images moves in steps). None: the loss judges every rung.
        folds: Further held-out slices that judge the final rung (`finetune.lr_find.trials.fold_count`): each opens
            ``(loader, holdout)`` as a context; every finalist trains on each slice's rest and the mean over the
            slices (``holdout``'s first) judges it. Empty: ``holdout`` alone.
    """
    snapshot = Snapshot.take(model)

    def trial(candidate: Any, updates: int, loader: Any = loader, holdout: Any = holdout) -> Any:
        """The held-out `EvalResult` after ``updates`` updates; None for a trial that blew up."""
        batches, progress = _cycle(loader), TrainState()
        try:
            loop = trainer(candidate, updates)
            model.train()
            for _ in range(updates * accumulate):
                inputs, target = next(batches)
                progress.batches_seen += 1
                loop.train_step(inputs, target, progress, update=progress.batches_seen % accumulate == 0)
            return loop.evaluate(holdout)
        except TrainingDiverged:  # this candidate blew up: it loses
            return None
        finally:
            batches.close()
            model.zero_grad(set_to_none=True)
            snapshot.restore()

    def score(candidate: Any, updates: int) -> float:
        result = trial(candidate, updates)
        return result.loss if result is not None else float("inf")

    slices: dict[Any, list[tuple[float, float | None]]] = {}  # the final rung's (loss, value) per held-out slice

    def judge(candidate: Any, updates: int) -> tuple[float, float | None]:
        results = slices[candidate] = [_judged(trial(candidate, updates), monitor)]
        for fold in folds:
            with fold() as (fold_loader, fold_holdout):
                results.append(_judged(trial(candidate, updates, fold_loader, fold_holdout), monitor))
        values = [value for _, value in results]
        return (statistics.fmean(loss for loss, _ in results),
                None if None in values else statistics.fmean(values))  # inf (blew up on a slice) stays inf

    family = (lambda c: c[1]) if candidates and isinstance(candidates[0], tuple) else (lambda c: None)
    rungs = select(candidates, score, first_updates=first_updates, final_updates=final_updates, family=family,
                   usual=usual, judge=judge if monitor or folds else None)
    if folds and rungs and rungs[-1].get("final"):
        rungs[-1] |= {"folds": 1 + len(folds), "slices": _slices_record(slices)}
    return rungs


def _judged(result: Any, monitor: str | None) -> tuple[float, float | None]:
    """``(loss, value)`` of a final-rung trial: ``value`` is ``monitor`` made lower-is-better, None where the loss
    alone judges (no monitor, or a metric of the run only, e.g. val/mAP of another task); inf for a trial that blew
    up."""
    if result is None:
        return float("inf"), float("inf")
    value = result.scalars("val").get(monitor) if monitor else None
    if value is None:
        return result.loss, None
    return result.loss, -value if infer_mode(monitor) == "max" else value


def _slices_record(slices: dict[Any, list[tuple[float, float | None]]]) -> list[list[Any]]:
    """Each finalist's ``[loss, value]`` on each held-out slice, for JSON (a ``(rate, freeze)`` pair as a list)."""
    return [[list(c) if isinstance(c, tuple) else c, [[_finite(loss), _finite(value)] for loss, value in results]]
            for c, results in slices.items()]


def _finite(number: float | None) -> float | None:
    """A number for JSON: None for a trial that blew up (inf) or a value the run does not measure."""
    return number if number is not None and math.isfinite(number) else None


def _cycle(loader: Any) -> Iterator[Any]:
    """``loader``'s batches, pass after pass, each pass a new epoch of its sampler (as `Trainer.train_epoch` sets
    it): a new order and new augmentations. Without it every pass repeats the first one's augmented images, and a
    trial longer than an epoch trains on a fixed set of crops: the whole network overfits them (on the few-shot
    benchmark its held-out loss after a run-long trial was 1.44 where the run itself reached 0.92)."""
    sampler = getattr(loader, "sampler", None)
    for epoch in itertools.count():
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader


def from_record(record: dict[str, Any]) -> LRFind:
    """The `LRFind` of a saved record (``lr_find.json``, the training state)."""
    fields = ("rates", "losses", "smoothed", "rule", "chosen", "reason", "chosen_index")
    return LRFind(**{k: record[k] for k in fields if k in record})


__all__ = ["RULES", "LRFind", "Snapshot", "candidate_rates", "draw_curve", "final_rung_updates", "first_rung_updates",
           "fold_count", "from_record", "frozen_candidate_rates", "further_folds", "holdout_split", "max_folds", "nearest",
           "num_updates_for", "per_update_beta", "range_test", "run_trials", "search", "select", "smooth_losses",
           "successive_halving", "suggest", "valley_pick"]
