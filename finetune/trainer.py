"""The training loop: steps, epochs, evaluation, early stopping. No config in here.

``Trainer`` gets built parts (model, optimizer, scheduler, loss, loaders) and
named settings; what happens around the loop (TensorBoard, metrics.jsonl,
checkpoints) plugs in as ``TrainerHook``s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from finetune.distributed import SINGLE, World
from finetune.errors import UserError
from finetune.metrics import EvalResult, MetricAccumulator, MultilabelAccumulator, infer_mode, is_better
from finetune.signals import STOP_SIGNALS, StopRequest, TrainingInterrupted

log = logging.getLogger("finetune")


class TrainingDiverged(UserError):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """Where training stands; saved in ``last.ckpt`` and restored on resume."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer updates done
    batches_seen: int = 0  # batches of the current epoch already trained on
    best_value: float | None = None
    best_epoch: int | None = None
    stale_epochs: int = 0  # epochs since the monitored metric last improved
    epoch_batches: int = 0  # length of the current epoch in batches, those trained before a resume included
    # (the field names are part of last.ckpt's format: renaming them would break older states)
    epoch_loss_sum: float = 0.0  # sum of per-image train losses so far this epoch
    epoch_images: int = 0  # images trained on so far this epoch
    step_logs: dict[str, float] = field(default_factory=dict)  # what the last update logged (train/loss, lr/*)

    @property
    def evaluation_pending(self) -> bool:
        """Every batch of the current epoch is trained on, its evaluation not yet done."""
        return 0 < self.epoch_batches <= self.batches_seen

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class TrainerHook:
    """What loggers, checkpointing and freezing see of the loop; override what you need."""

    def on_epoch_start(self, state: TrainState) -> None:
        """Before the epoch ``state.epoch`` (0-based) trains; the model is already in train mode."""

    def on_step(self, state: TrainState, logs: dict[str, float]) -> None:
        """After each optimizer update (``state.global_step`` counts them)."""

    def on_epoch_end(self, state: TrainState, logs: dict[str, float], result: EvalResult,
                     improved: bool) -> None:
        """After evaluation; ``state.epoch`` counts completed epochs."""

    def on_interrupt(self, state: TrainState) -> None:
        """A stop was requested (SIGTERM/SIGINT); called at an optimizer-update boundary, then the fit stops."""

    def on_fit_end(self, state: TrainState) -> None:
        """Training finished normally (``max_epochs`` reached or early stopping)."""

    def close(self) -> None:
        """The run is over (however it ended)."""


class Trainer:
    """Fits a classifier: per-update scheduling, accumulation, clipping, AMP, EMA, early stopping.

    Under DDP (``world`` of several processes) the model trains wrapped in
    ``DistributedDataParallel`` (re-wrapped when a freezing schedule changes what trains), the
    non-final micro-batches of an accumulation window skip the gradient all-reduce (``no_sync``),
    and each process's loss is scaled so that the averaged gradient is the single-process gradient
    of the global batch, however unevenly its last batch is split. The logged losses, the
    evaluation and the stop decision (a signal on any process) are reduced over the processes, so
    every process takes the same decisions at the same step.
    """

    def __init__(self, *, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                 device: torch.device, num_classes: int, max_epochs: int, scheduler: Any = None,
                 autocast_dtype: torch.dtype | None = None, grad_scaler: torch.amp.GradScaler | None = None,
                 accumulate: int = 1, grad_clip: float | None = None, ema: Any = None,
                 channels_last: bool = False, monitor: str = "val/acc1", mode: str | None = None,
                 patience: int | None = None, min_delta: float = 0.0, hooks: Sequence[TrainerHook] = (),
                 progress_bar: bool = True, stop: StopRequest | None = None, world: World = SINGLE,
                 ddp_options: dict[str, Any] | None = None, mixer: Any = None, multilabel: bool = False):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.scheduler, self.grad_scaler, self.ema = scheduler, grad_scaler, ema
        self.device, self.num_classes, self.max_epochs = device, num_classes, max_epochs
        self.autocast_dtype, self.accumulate, self.grad_clip = autocast_dtype, accumulate, grad_clip
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.monitor, self.mode = monitor, mode or infer_mode(monitor)
        self.patience, self.min_delta = patience, min_delta
        self.hooks, self.progress_bar = list(hooks), progress_bar
        self.stop = stop  # polled at optimizer-update boundaries; set by SIGTERM/SIGINT
        self.multilabel = multilabel  # targets are multi-hot rows; sigmoid scores, BCE, val/mAP
        self.eval_loss = multilabel_eval_loss(num_classes) if multilabel else nn.CrossEntropyLoss(reduction="sum")
        self.world, self.ddp_options = world, dict(ddp_options or {})
        self.mixer = mixer  # Mixup/CutMix of training batches (finetune.mixing.BatchMixer), soft targets
        self.train_model: nn.Module = model  # what the forward of a training step calls (DDP's wrapper under DDP)
        self._trainable: tuple[bool, ...] | None = None  # which parameters the DDP wrapper was built for
        self._window = [0.0, 0.0]  # loss sum and images of the micro-batches since the last update (this process)
        self._last = (0.0, 0)  # loss sum and images of the latest micro-batch (this process)

    # ----------------------------------------------------------------- fit
    def fit(self, train_loader: Iterable, val_loader: Iterable, state: TrainState | None = None) -> TrainState:
        """Train from ``state`` (a fresh one by default) until ``max_epochs`` or early stopping."""
        state = state or TrainState()
        while state.epoch < self.max_epochs:
            started = time.perf_counter()
            logs = self.train_epoch(train_loader, state)
            result = self.evaluate(val_loader)
            improved = self._judge(state, result.scalars() | logs)
            state.epoch, state.batches_seen = state.epoch + 1, 0
            logs["seconds"] = time.perf_counter() - started
            self._log_epoch(state, logs, result)
            for hook in self.hooks:
                hook.on_epoch_end(state, logs, result, improved)
            self._stop_if_requested(state)
            if self.patience is not None and state.stale_epochs >= self.patience:  # agreed in _judge
                log.info(f"early stopping: {self.monitor} did not improve for {state.stale_epochs} epochs")
                break
        for hook in self.hooks:
            hook.on_fit_end(state)
        return state

    # --------------------------------------------------------------- epoch
    def train_epoch(self, loader: Iterable, state: TrainState) -> dict[str, float]:
        """One pass over the training data; returns the epoch's mean loss and last rates."""
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(state.epoch)
        if state.batches_seen and hasattr(sampler, "set_start"):  # resumed mid-epoch: skip, at the index level
            per_update = getattr(sampler, "global_batch", loader.batch_size)  # positions per batch, all processes
            sampler.set_start(min(state.batches_seen * per_update, sampler.num_samples))
        self.model.train()
        for hook in self.hooks:
            hook.on_epoch_start(state)
        self._wrap_for_training()  # after the hooks: a freezing schedule may have changed what trains
        # Resumed mid-epoch, the sampler starts after the batches already trained on, so the loader
        # yields only the rest: the epoch's full length adds those back.
        total_batches = state.epoch_batches = len(loader) + state.batches_seen
        loss_sum, images, started = state.epoch_loss_sum, state.epoch_images, time.perf_counter()
        # One iter() of the loader per epoch, handed to tqdm: tqdm calls iter() on what it is given more
        # than once, and a second iter() of a loader with persistent workers restarts its sampler (whose
        # mid-epoch skip applies to one pass), after the workers had already fetched from the first.
        bar = tqdm(iter(loader), total=total_batches, initial=state.batches_seen, disable=not self.progress_bar,
                   desc=f"epoch {state.epoch + 1}/{self.max_epochs}", dynamic_ncols=True, leave=False)
        for inputs, target in bar:
            state.batches_seen += 1
            update = state.batches_seen % self.accumulate == 0 or state.batches_seen == total_batches
            rates = self.learning_rates()  # the rates this update uses: the scheduler steps inside it
            loss = self.train_step(inputs, target, state, update=update)
            if not self.world.distributed:
                loss_sum, images = loss_sum + loss * target.shape[0], images + target.shape[0]
                state.epoch_loss_sum, state.epoch_images = loss_sum, images
            logs = {"train/loss": loss, **rates}
            if update:
                if self.world.distributed:  # the update's losses over every process (with the stop flags)
                    loss_sum, images, logs["train/loss"] = self._reduced_window(loss_sum, images)
                    state.epoch_loss_sum, state.epoch_images = loss_sum, images
                state.step_logs = logs
                for hook in self.hooks:
                    hook.on_step(state, logs)
                self._stop_if_requested(state)
            speed = images / max(time.perf_counter() - started, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                            img_s=f"{speed:.1f}", refresh=False)
        bar.close()
        state.epoch_loss_sum, state.epoch_images = 0.0, 0
        return {"train/loss": loss_sum / max(images, 1), **self.learning_rates()}

    # ---------------------------------------------------------------- step
    def train_step(self, inputs: torch.Tensor, target: torch.Tensor, state: TrainState, *, update: bool) -> float:
        """Forward and backward on one batch; an optimizer update when ``update``. Returns the loss."""
        inputs = inputs.to(self.device, non_blocking=True, memory_format=self.memory_format)
        target = target.to(self.device, non_blocking=True)
        if self.mixer is not None:
            inputs, target = self.mixer(inputs, target, epoch=state.epoch, batch=state.batches_seen)
        # Under DDP, the non-final micro-batches of an accumulation window skip the all-reduce.
        sync = self.train_model.no_sync() if self.world.distributed and not update else contextlib.nullcontext()
        with sync:
            with self._autocast():
                logits = self.train_model(inputs)
                loss = self.loss_fn(logits, target)
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingDiverged(
                    f"train/loss became {value} at epoch {state.epoch + 1}, batch {state.batches_seen}: lower "
                    "optim.lr, set trainer.grad_clip, or use trainer.precision=32; the last checkpoint is kept")
            if self.world.distributed:
                loss = self._share_of_global_loss(logits, target)
                self._window = [self._window[0] + value * target.shape[0], self._window[1] + target.shape[0]]
                self._last = (value * target.shape[0], target.shape[0])
            scaled = loss / self.accumulate
            (self.grad_scaler.scale(scaled) if self.grad_scaler else scaled).backward()
        if update:
            self._optimizer_update(state)
        return value

    def _share_of_global_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """This process's part of the global batch's loss, scaled so that DDP's gradient average (sum
        over processes / world size) is the gradient of the loss over the whole global batch.

        The loss function's own mean divides by this process's images (or class weights); the
        global batch divides by all processes' together, which one small all-reduce gives.
        """
        if self.multilabel:  # the loss's mean over this process's images and classes, then over the global batch
            total = self.loss_fn(logits.float(), target) * target.numel()
            denominator = torch.tensor([float(target.numel())], device=logits.device)
            torch.distributed.all_reduce(denominator)
            return total * self.world.size / denominator
        weight = getattr(self.loss_fn, "weight", None)
        smoothing = getattr(self.loss_fn, "label_smoothing", 0.0)
        total = torch.nn.functional.cross_entropy(logits.float(), target, weight=weight, reduction="sum",
                                                  label_smoothing=smoothing)
        denominator = (weight[target].sum() if weight is not None else
                       torch.tensor(float(target.shape[0]), device=logits.device)).detach().float().reshape(1)
        torch.distributed.all_reduce(denominator)
        return total * self.world.size / denominator.clamp(min=1e-12)

    def _reduced_window(self, loss_sum: float, images: int) -> tuple[float, int, float]:
        """The epoch's loss sum and images, and the update's last batch's mean loss, over every process."""
        window, last = self._window, self._last
        self._window = [0.0, 0.0]
        total = self.world.sum([*window, *last]).tolist()
        return loss_sum + total[0], images + int(total[1]), total[2] / max(total[3], 1)

    def _optimizer_update(self, state: TrainState) -> None:
        if self.grad_clip is not None:
            if self.grad_scaler:
                self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        if self.grad_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=state.global_step)
        if self.ema is not None:
            self.ema.update(self.model, step=state.global_step)

    # ------------------------------------------------------------ evaluate
    @torch.no_grad()
    def evaluate(self, loader: Iterable, model: nn.Module | None = None) -> EvalResult:
        """Loss, accuracies and confusion matrix over ``loader`` (EMA weights when EMA is on)."""
        model = model or (self.ema.module if self.ema is not None else self.model)  # never the DDP wrapper
        if self.world.distributed:
            # DDP broadcasts rank 0's buffers at the start of each training forward, then every rank's forward
            # updates its own BatchNorm statistics: without this, each rank would evaluate its shard with other
            # running statistics than the model rank 0 saves (and evaluate reproduces).
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        was_training = model.training
        model.eval()
        batches = getattr(loader, "batch_sampler", None)  # `EvalBatches`: which batches of the whole set are ours
        batch_ids = getattr(batches, "batch_ids", None)
        accumulator = MultilabelAccumulator if self.multilabel else MetricAccumulator
        acc = accumulator(self.num_classes, total_batches=getattr(batches, "total_batches", None))
        for k, (inputs, target) in enumerate(loader):
            inputs = inputs.to(self.device, non_blocking=True, memory_format=self.memory_format)
            target = target.to(self.device, non_blocking=True)
            with self._autocast():
                logits = model(inputs)
            logits = logits.float()
            acc.update(logits, target, self.eval_loss(logits, target).item(),
                       batch=batch_ids[k] if batch_ids is not None else None)
        model.train(was_training)
        result = acc.result(self.world)
        expected = len(loader.dataset) if hasattr(loader, "dataset") and batch_ids is not None else None
        if expected is not None and acc.reduced_count != expected:
            raise RuntimeError(f"evaluated {acc.reduced_count} images of {expected}: the shards do not cover "
                               "the validation set exactly once")
        return result

    # ------------------------------------------------------------- helpers
    def learning_rates(self) -> dict[str, float]:
        """Current rate of each named parameter group, ``lr/<group>``; 0 while all of its parameters are frozen."""
        return {f"lr/{g.get('name', i)}": g["lr"] if any(p.requires_grad for p in g["params"]) else 0.0
                for i, g in enumerate(self.optimizer.param_groups)}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def _stop_signal(self) -> int | None:
        """The signal that asks this process to stop, if any (not yet agreed on under DDP)."""
        return None if self.stop is None else self.stop.signum

    def _stop_if_requested(self, state: TrainState) -> None:
        """After an update (or an epoch): if a signal asked to stop, let hooks save, then stop.

        Under DDP a signal on any process stops all of them at this same boundary: the flags are
        summed over the processes (one all-reduce), then every process saves (rank 0 writes).
        """
        signum = self._stop_signal()
        if self.world.distributed:
            flags = self.world.sum([1.0 if signum == s else 0.0 for s in self.STOP_ORDER]).tolist()
            signum = next((s for s, flag in zip(self.STOP_ORDER, flags) if flag), None)
        if signum is None:
            return
        for hook in self.hooks:
            hook.on_interrupt(state)
        raise TrainingInterrupted(signum)

    STOP_ORDER = tuple(STOP_SIGNALS)  # under DDP, the first of these sent to any process stops all

    def _wrap_for_training(self) -> None:
        """Under DDP: wrap the model for its parameters that train now (again when that changed)."""
        if not self.world.distributed:
            return
        trainable = tuple(p.requires_grad for p in self.model.parameters())
        if trainable == self._trainable:
            return
        from torch.nn.parallel import DistributedDataParallel

        if self._trainable is not None:
            log.info("the trainable parameters changed: DistributedDataParallel wraps the model again")
        self._trainable = trainable
        self.train_model = DistributedDataParallel(self.model, **self.ddp_options)

    def _judge(self, state: TrainState, metrics: dict[str, float]) -> bool:
        """Whether the epoch improved on the best (`_track_best`), and the best and stale count that follow:
        rank 0's verdict on every process (`World.agree`), so that saving and early stopping agree."""
        improved = self._track_best(state, metrics)
        state.best_value, state.best_epoch, state.stale_epochs, improved = self.world.agree(
            (state.best_value, state.best_epoch, state.stale_epochs, improved))
        return improved

    def _track_best(self, state: TrainState, metrics: dict[str, float]) -> bool:
        if self.monitor not in metrics:
            raise UserError(f"checkpoint.monitor '{self.monitor}' is not a metric of this run; "
                            f"choose one of {', '.join(sorted(k for k in metrics if '/' in k))}")
        value = metrics[self.monitor]
        improved = is_better(value, state.best_value, mode=self.mode, min_delta=self.min_delta)  # the policy's rule
        if improved:
            state.best_value, state.best_epoch, state.stale_epochs = value, state.epoch + 1, 0
        else:
            state.stale_epochs += 1
        return improved

    def _log_epoch(self, state: TrainState, logs: dict[str, float], result: EvalResult) -> None:
        scalars = " ".join(f"{k} {v:.4f}" for k, v in result.scalars().items())
        log.info(f"epoch {state.epoch}/{self.max_epochs} step {state.global_step} "
                 f"train/loss {logs['train/loss']:.4f} {scalars} best {self.monitor} {state.best_value:.4f} "
                 f"(epoch {state.best_epoch}) {logs['seconds']:.1f}s")


def multilabel_eval_loss(num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """val/loss of label sets: BCE-with-logits summed over the images, each image's mean over the classes."""
    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / num_classes
    return loss
